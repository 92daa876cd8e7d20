"""``mlxfun stats show --plot``: writes a PNG heatmap (matplotlib, the ``mlxfun-cli[plot]``
extra), padded columns of non-uniform stats blank; without matplotlib a one-line error."""

import struct
import sys

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core.stats import save_stats

COUNTS = [6, 8, 5]


def write_stats(path, layers=3, width=8, counts=COUNTS):
    scores = np.random.default_rng(0).random((layers, width))
    fingerprint = {
        "model_type": "qwen3_moe",
        "config_hash": "abc",
        "moe_layers": list(range(layers)),
        "experts_per_layer": counts,
        "top_k": [2] * layers,
    }
    metadata = {"fingerprint": fingerprint, "moe_layers": list(range(layers)), "tokens_seen": 5}
    save_stats(path, {"reap": scores}, {}, np.full(layers, 5, dtype=np.int64), metadata)
    return path


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_heatmap(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    stats = write_stats(tmp_path / "s.npz")
    out = tmp_path / "pics" / "heat.png"  # the folder does not exist yet
    assert main(["stats", "show", str(stats), "--plot", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.stat().st_size > 1000
    assert png_size(out) == (720, 360)  # 6 x 3 inches at 120 dpi, the smallest figure


def test_plot_of_a_large_model_is_capped(tmp_path):
    pytest.importorskip("matplotlib")
    stats = write_stats(tmp_path / "s.npz", layers=60, width=256, counts=[256] * 60)
    out = tmp_path / "heat.png"
    assert main(["stats", "show", str(stats), "--plot", str(out), "--json"]) == 0
    assert png_size(out) == (24 * 120, 16 * 120)


def test_padded_columns_are_blank(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    stats = write_stats(tmp_path / "s.npz")
    out = tmp_path / "heat.png"
    assert main(["stats", "show", str(stats), "--plot", str(out)]) == 0
    image = imread(out)[..., :3]
    height, width = image.shape[:2]
    white = (image > 0.99).all(axis=-1)
    # layer 2 (5 experts, bottom row) has columns 5..7 padded: white cells inside the axes
    assert white[int(height * 0.75), int(width * 0.65)]
    # layer 1 (8 experts, middle row) has none there
    assert not white[int(height * 0.5), int(width * 0.65)]


def test_missing_matplotlib_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    stats = write_stats(tmp_path / "s.npz")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "heat.png"
    assert main(["stats", "show", str(stats), "--plot", str(out)]) == 1
    err = capsys.readouterr().err
    # (warnings of the test plugins may come first; the error is the last line, and one line)
    assert err.splitlines()[-1] == "error: --plot needs matplotlib: pip install 'mlxfun-cli[plot]'"
    assert "Traceback" not in err
    assert not out.exists()
