"""The key/value cache that makes generation cost O(T) per new token instead of O(T^2).

At step t the new token's query must attend to the keys and values of all earlier tokens.
Those never change (causal attention), so we keep them: per layer one buffer
[B, kv_heads, max_len, head_dim] for keys and one for values, allocated once and filled in place
(no torch.cat per step, which would copy the whole history every token).
"""

import torch


class KVCache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor] = []  # one [B, kv_heads, max_len, head_dim] per layer
        self.values: list[torch.Tensor] = []
        self.length = 0  # positions filled so far (same for every row: padding is on the left)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v [B, kv_heads, T, d] and return all keys/values up to now."""
        # BEGIN EXERCISE 03.2: the KV cache update
        if layer == len(self.keys):  # first call for this layer: allocate its buffers
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, max_len={self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        # END EXERCISE

    def advance(self, n: int):
        """Called once per forward, after every layer has written its n new positions."""
        self.length += n
