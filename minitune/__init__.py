"""minitune: LLM post-training written from scratch in readable PyTorch."""
