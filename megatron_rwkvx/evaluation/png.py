"""Minimal PNG output without plotting libraries: an RGB canvas, a 3x5 digit font, the encoder.

matplotlib is not a dependency; the evaluation tools draw their heatmap and line plot here.
"""
from __future__ import annotations

import struct
import zlib
from typing import List, Sequence, Tuple

RGB = Tuple[int, int, int]

# 3x5 glyphs, rows top to bottom, bits left to right.
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "%": (5, 1, 2, 4, 5),
    "K": (5, 5, 6, 5, 5), "M": (5, 7, 7, 5, 5), "-": (0, 0, 7, 0, 0), " ": (0, 0, 0, 0, 0),
}


class Canvas:
    def __init__(self, width: int, height: int, background: RGB = (255, 255, 255)) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"canvas must be at least 1x1, got {width}x{height}")
        self.width, self.height = width, height
        self.pixels: List[bytearray] = [bytearray(bytes(background) * width) for _ in range(height)]

    def set(self, x: int, y: int, color: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.pixels[y][3 * x : 3 * x + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: RGB) -> None:
        for y in range(max(0, y0), min(self.height, y1)):
            lo, hi = max(0, x0), min(self.width, x1)
            if hi > lo:
                self.pixels[y][3 * lo : 3 * hi] = bytes(color) * (hi - lo)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: RGB) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.set(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color)

    def text(self, x: int, y: int, text: str, color: RGB = (0, 0, 0), scale: int = 2) -> None:
        """Digits and a few symbols (``0-9 . % K M -``); other characters draw as blanks."""
        for i, ch in enumerate(text):
            glyph = _GLYPHS.get(ch.upper(), _GLYPHS[" "])
            for row, bits in enumerate(glyph):
                for col in range(3):
                    if bits & (4 >> col):
                        self.rect(x + (4 * i + col) * scale, y + row * scale,
                                  x + (4 * i + col + 1) * scale, y + (row + 1) * scale, color)

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return 4 * len(text) * scale

    def to_png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        raw = b"".join(b"\x00" + bytes(row) for row in self.pixels)  # filter 0 per row
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_png())


def read_png_size(data: bytes) -> Tuple[int, int]:
    """(width, height) of a PNG (used by tests to check what the tools wrote)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", data[16:24])


def short_number(n: float) -> str:
    n = int(n)
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def _score_color(value: float) -> RGB:
    """0 -> red, 0.5 -> yellow, 1 -> green (the usual passkey heatmap scale)."""
    v = min(1.0, max(0.0, value))
    if v < 0.5:
        return (230, round(60 + 340 * v), 60)
    return (round(230 - 340 * (v - 0.5)), 230, 60)


def heatmap(values: Sequence[Sequence[float]], x_labels: Sequence[str], y_labels: Sequence[str],
            cell: int = 28) -> Canvas:
    """``values[y][x]`` in [0, 1] as coloured cells; labels under the columns and left of the rows."""
    rows, cols = len(values), len(values[0]) if values else 0
    if rows == 0 or cols == 0 or any(len(r) != cols for r in values):
        raise ValueError("heatmap values must be a non-empty rectangular list of rows")
    if len(x_labels) != cols or len(y_labels) != rows:
        raise ValueError(f"need {cols} x labels and {rows} y labels, got {len(x_labels)} and {len(y_labels)}")
    left = max(Canvas.text_width(s) for s in y_labels) + 8
    cell_w = max(cell, max(Canvas.text_width(s) for s in x_labels) + 6)
    canvas = Canvas(left + cols * cell_w + 4, rows * cell + 24)
    for y in range(rows):
        canvas.text(2, y * cell + cell // 2 - 5, y_labels[y])
        for x in range(cols):
            x0 = left + x * cell_w
            canvas.rect(x0, y * cell, x0 + cell_w - 1, (y + 1) * cell - 1, _score_color(values[y][x]))
    for x in range(cols):
        canvas.text(left + x * cell_w + 3, rows * cell + 8, x_labels[x])
    return canvas


def line_plot(xs: Sequence[float], ys: Sequence[float], width: int = 480, height: int = 260) -> Canvas:
    """A polyline of (x, y) with the y range printed at the left and the x range below."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("line_plot needs equally long, non-empty xs and ys")
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    left, bottom = 60, 24
    canvas = Canvas(width, height)
    plot_w, plot_h = width - left - 10, height - bottom - 10
    canvas.line(left, 10, left, 10 + plot_h, (0, 0, 0))
    canvas.line(left, 10 + plot_h, left + plot_w, 10 + plot_h, (0, 0, 0))
    x_lo, x_hi = min(xs), max(xs)
    x_span = (x_hi - x_lo) or 1.0
    points = [(left + round((x - x_lo) / x_span * plot_w), 10 + round((hi - y) / span * plot_h))
              for x, y in zip(xs, ys)]
    for (a, b), (c, d) in zip(points, points[1:]):
        canvas.line(a, b, c, d, (30, 90, 200))
    for a, b in points:
        canvas.rect(a - 2, b - 2, a + 3, b + 3, (30, 90, 200))
    canvas.text(2, 8, f"{hi:.2f}")
    canvas.text(2, 10 + plot_h - 10, f"{lo:.2f}")
    canvas.text(left, height - 14, short_number(x_lo))
    label = short_number(x_hi)
    canvas.text(left + plot_w - Canvas.text_width(label), height - 14, label)
    return canvas
