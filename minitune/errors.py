"""The one error type for input a user can fix: a bad config value, data file, checkpoint or template.

Every module raises its own subclass (ConfigError, CheckpointError, DataError, ...), each message
naming the file (and line, record or field) and what was expected. The command line catches
`UserError` and prints it as one line, `error: <file>[:line]: <what> (<expected>)`, with exit code 2;
anything else is a bug of ours and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input, not a bug: the message alone tells the user what to fix."""
