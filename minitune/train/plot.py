"""The loss curve as a PNG, drawn pixel by pixel with the standard library (no matplotlib).

A PNG file is the 8-byte signature, then chunks of [length, type, data, CRC-32]:
IHDR (width, height, bit depth 8, colour type 2 = RGB), IDAT (the zlib-compressed rows, each
prefixed by a filter byte, 0 = none) and IEND. Lines are drawn with Bresenham's algorithm and
tick labels with a 3x5-pixel bitmap font, scaled up.
"""

import json
import math
import struct
import zlib
from pathlib import Path

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)
LIGHT_BLUE, BLUE, ORANGE = (160, 190, 235), (31, 90, 180), (230, 120, 20)

# 3x5 glyphs, rows top to bottom, '1' = ink
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "010101111100011", "a": "000011101101011", "i": "010000010010010",
    "l": "110010010010111", "n": "000110101101101", "o": "000010101101010", "p": "000110101110100",
    "r": "000101110100100", "s": "000011110001110", "t": "010111010010001", "v": "000101101101010",
    " ": "000000000000000", "_": "000000000000111", "d": "001001011101011", "k": "100101110101101",
    "w": "000101101111101",
}


def encode_png(pixels: list[bytearray], width: int, height: int) -> bytes:
    """RGB rows (3 * width bytes each) -> PNG bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.rows = [bytearray(WHITE * width) for _ in range(height)]

    def dot(self, x: int, y: int, color):
        if 0 <= x < self.w and 0 <= y < self.h:
            self.rows[y][3 * x:3 * x + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thick: int = 1):
        """Bresenham: step along the major axis, carry the error of the minor one."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for t in range(thick):
                self.dot(x0, y0 + t, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2):
        """Write s with its top-left corner at (x, y); unknown characters are left blank."""
        for ch in s:
            glyph = FONT.get(ch, FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    for a in range(scale):
                        for b in range(scale):
                            self.dot(x + (i % 3) * scale + a, y + (i // 3) * scale + b, color)
            x += 4 * scale


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * 4 * scale - scale


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average (bias-corrected), the dark curve over the raw losses.

    The default weight grows with the number of points, as LLaMA-Factory's plot does
    (1.8 * (sigmoid(0.05 n) - 0.5)): a short run is barely smoothed, so the curve doesn't lag."""
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_losses(path, steps: list[int], losses: list[float], eval_steps=(), eval_losses=(),
                width: int = 640, height: int = 400, label: str = "loss") -> Path:
    """Write a line plot of training (and evaluation) loss against step to `path`; `label` names the
    quantity when it is not a loss (the RL stages plot their reward and KL)."""
    left, right, top, bottom = 70, 20, 30, 45
    c = Canvas(width, height)
    ys = list(losses) + list(eval_losses)
    xs = list(steps) + list(eval_steps)
    if not ys:
        ys, xs = [0.0, 1.0], [0, 1]
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    pw, ph = width - left - right, height - top - bottom

    def px(x, y):
        return (left + round((x - x0) / (x1 - x0) * pw), top + round((y1 - y) / (y1 - y0) * ph))

    for k in range(5):  # grid lines and tick labels
        yv, xv = y0 + (y1 - y0) * k / 4, round(x0 + (x1 - x0) * k / 4)
        gy, gx = px(x0, yv)[1], px(xv, y0)[0]
        c.line(left, gy, left + pw, gy, GREY)
        c.line(gx, top, gx, top + ph, GREY)
        tick = f"{yv:.3g}"
        c.text(left - 8 - text_width(tick), gy - 5, tick)
        c.text(gx - text_width(str(xv)) // 2, top + ph + 8, str(xv))
    c.line(left, top, left, top + ph, BLACK, thick=2)
    c.line(left, top + ph, left + pw, top + ph, BLACK, thick=2)
    c.text(left + pw // 2 - text_width("step") // 2, height - 16, "step")
    c.text(8, 8, label, BLUE)
    if eval_losses:
        c.text(8 + text_width(label + " ") + 8, 8, f"eval_{label}", ORANGE)

    def polyline(xs_, ys_, color, thick):
        pts = [px(x, y) for x, y in zip(xs_, ys_)]
        for (a, b), (p, q) in zip(pts, pts[1:]):
            c.line(a, b, p, q, color, thick)
        if len(pts) == 1:
            c.line(*pts[0], *pts[0], color, thick)
        return pts

    polyline(steps, losses, LIGHT_BLUE if len(losses) >= 10 else BLUE, 1)
    if len(losses) >= 10:
        polyline(steps, smooth(list(losses)), BLUE, 2)
    for x, y in polyline(list(eval_steps), list(eval_losses), ORANGE, 2):
        for d in range(-2, 3):
            c.line(x - 2, y + d, x + 2, y + d, ORANGE)
    path = Path(path)
    path.write_bytes(encode_png(c.rows, width, height))
    return path


def plot_log(log_path, png_path, key: str = "loss") -> Path:
    """Plot the `key` and `eval_{key}` records of a trainer_log.jsonl (key: "loss"; PPO/GRPO: "reward", "kl")."""
    train, evals = [], []
    for line in Path(log_path).read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if key in r and math.isfinite(r[key]):
            train.append((r["step"], r[key]))
        if f"eval_{key}" in r and math.isfinite(r[f"eval_{key}"]):
            evals.append((r["step"], r[f"eval_{key}"]))
    return plot_losses(png_path, [s for s, _ in train], [v for _, v in train],
                       [s for s, _ in evals], [v for _, v in evals], label=key)
