"""Two small PNG charts drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = [
    (76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179),
    (147, 120, 96), (218, 139, 195), (140, 140, 140), (204, 185, 116), (100, 181, 205),
]
WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (120, 120, 120), (235, 235, 235)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_max(value: float) -> Tuple[float, float]:
    """A round axis maximum >= value and its tick step (1, 2 or 5 x 10^k, at most 6 ticks)."""
    if value <= 0:
        return 1.0, 0.25
    exp = 10 ** math.floor(math.log10(value))
    for step in (exp / 10, exp / 5, exp / 2, exp, 2 * exp, 5 * exp):
        top = math.ceil(value / step - 1e-9) * step
        if top / step <= 6:
            return top, step
    return value, value / 4


def _axes(draw, box, y_max, y_step, ylabel, font):
    x0, y0, x1, y1 = box  # plot area: (left, top, right, bottom)
    for k in range(int(round(y_max / y_step)) + 1):
        v = k * y_step
        y = y1 - (y1 - y0) * v / y_max
        draw.line([(x0, y), (x1, y)], fill=LIGHT)
        label = f"{round(v, 9):g}"
        w, h = _text_size(draw, label, font)
        draw.text((x0 - w - 6, y - h / 2 - 2), label, fill=BLACK, font=font)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=BLACK, width=1)
    draw.text((8, y0 - 22), ylabel, fill=BLACK, font=font)


def stacked_bars(
    path: str, groups: Sequence[str], segments: Sequence[Tuple[str, Sequence[float]]], *,
    title: str, ylabel: str, totals: Optional[Sequence[float]] = None, size=(900, 520),
) -> None:
    """One bar per group (e.g. pipeline stage), stacked from `segments` = [(label, value per group)]."""
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    font, title_font = _font(13), _font(17)
    legend_w = 260
    box = (80, 60, size[0] - legend_w - 20, size[1] - 50)
    heights = [sum(max(0.0, seg[1][i]) for seg in segments) for i in range(len(groups))]
    y_max, y_step = _nice_max(max(heights + list(totals or []) + [1e-9]))
    draw.text((box[0], 15), title, fill=BLACK, font=title_font)
    _axes(draw, box, y_max, y_step, ylabel, font)
    x0, y0, x1, y1 = box
    n = max(1, len(groups))
    slot = (x1 - x0) / n
    bar_w = min(120.0, slot * 0.6)
    for i, group in enumerate(groups):
        cx = x0 + slot * (i + 0.5)
        base = 0.0
        for j, (_, values) in enumerate(segments):
            value = max(0.0, values[i])
            if value <= 0:
                continue
            top = base + value
            ya, yb = y1 - (y1 - y0) * top / y_max, y1 - (y1 - y0) * base / y_max
            draw.rectangle([cx - bar_w / 2, ya, cx + bar_w / 2, yb], fill=PALETTE[j % len(PALETTE)], outline=WHITE)
            base = top
        label_top = heights[i]
        if totals is not None:
            yt = y1 - (y1 - y0) * totals[i] / y_max
            draw.line([(cx - bar_w / 2 - 8, yt), (cx + bar_w / 2 + 8, yt)], fill=BLACK, width=2)
            label_top = max(label_top, totals[i])
        total_label = f"{label_top:.1f}"
        w, h = _text_size(draw, total_label, font)
        draw.text((cx - w / 2, y1 - (y1 - y0) * label_top / y_max - h - 8), total_label, fill=BLACK, font=font)
        w, h = _text_size(draw, group, font)
        draw.text((cx - w / 2, y1 + 8), group, fill=BLACK, font=font)
    lx, ly = size[0] - legend_w, y0
    for j, (label, _) in enumerate(segments):
        draw.rectangle([lx, ly + 22 * j, lx + 14, ly + 22 * j + 14], fill=PALETTE[j % len(PALETTE)])
        draw.text((lx + 20, ly + 22 * j), label, fill=BLACK, font=font)
    if totals is not None:
        yl = ly + 22 * len(segments) + 7
        draw.line([(lx, yl), (lx + 14, yl)], fill=BLACK, width=2)
        draw.text((lx + 20, yl - 7), "measured step", fill=BLACK, font=font)
    img.save(path)


def line_chart(
    path: str, xs: Sequence[float], series: Sequence[Tuple[str, Sequence[float]]], *,
    title: str, xlabel: str, ylabel: str, shade: Optional[Tuple[float, float, str]] = None,
    marks: Optional[List[Tuple[float, float, str]]] = None, size=(900, 480),
) -> None:
    """Lines over x; `shade` = (x_from, x_to, label) greys a span (warmup), `marks` boxes spans (traced)."""
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    font, title_font = _font(13), _font(17)
    box = (80, 60, size[0] - 30, size[1] - 60)
    x0, y0, x1, y1 = box
    all_y = [v for _, ys in series for v in ys] or [1.0]
    y_max, y_step = _nice_max(max(all_y))
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_lo, x_hi = x_lo - 0.5, x_hi + 0.5

    def px(x):
        return x0 + (x1 - x0) * (x - x_lo) / (x_hi - x_lo)

    def py(y):
        return y1 - (y1 - y0) * y / y_max

    if shade is not None:
        draw.rectangle([px(shade[0]), y0, px(shade[1]), y1], fill=(242, 242, 242))
        draw.text((px(shade[0]) + 4, y0 + 4), shade[2], fill=GREY, font=font)
    for a, b, label in marks or []:
        draw.rectangle([px(a), y0, px(b), y1], outline=(196, 78, 82), width=2)
        draw.text((px(a) + 4, y1 - 20), label, fill=(196, 78, 82), font=font)
    draw.text((x0, 15), title, fill=BLACK, font=title_font)
    _axes(draw, box, y_max, y_step, ylabel, font)
    tick_every = max(1, int(math.ceil(len(xs) / 20)))
    for k, x in enumerate(xs):
        if k % tick_every == 0:
            label = f"{x:g}"
            w, _ = _text_size(draw, label, font)
            draw.line([(px(x), y1), (px(x), y1 + 4)], fill=BLACK)
            draw.text((px(x) - w / 2, y1 + 8), label, fill=BLACK, font=font)
    w, _ = _text_size(draw, xlabel, font)
    draw.text(((x0 + x1) / 2 - w / 2, y1 + 30), xlabel, fill=BLACK, font=font)
    for j, (label, ys) in enumerate(series):
        color = PALETTE[j % len(PALETTE)]
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((x1 - 200, y0 + 4 + 18 * j), f"- {label}", fill=color, font=font)
    img.save(path)
