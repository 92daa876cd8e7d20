"""The dashboard in a real headless Chromium (Playwright driving the system browser), against a
real ``mlxfun serve``. ``tox -e ui`` installs both; elsewhere these tests are skipped."""

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from mlxfun.cli.app import main
from mlxfun.core.testing import TINY_ARGS, save_tiny_checkpoint

from .serve_helpers import KEY, Server

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (tox -e ui installs it)"
)
CHROMIUM = os.environ.get("MLXFUN_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (apt-get install chromium, or set MLXFUN_CHROMIUM); tox -e ui "
    "installs it when run as root",
)
SCREENSHOTS = os.environ.get("MLXFUN_SCREENSHOTS")  # a folder: save the docs' screenshots

MODEL = dict(TINY_ARGS, num_hidden_layers=4, num_experts=16, max_position_embeddings=256)
TEXTS = [f"def f{i}(x):\n    return x * {i}\n" for i in range(6)] + [
    f"The {w} walked along the river." for w in "cat dog bird fox".split()
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    model = save_tiny_checkpoint(root / "model", "qwen3_moe", MODEL, seed=5)
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    stats = root / "code.npz"
    assert main(["collect", "--model", str(model), "--dataset", str(data), "-o", str(stats)]) == 0
    workdir = root / "work"
    workdir.mkdir()
    server = Server(model, workdir)
    yield server, model, stats, workdir
    server.stop()


@pytest.fixture(scope="module")
def browser():
    # Playwright's node driver dies at start ("pthread_create: Invalid argument") with
    # README's OpenBLAS LD_PRELOAD; the browser does not need it.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            yield browser
            browser.close()
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


@pytest.fixture
def page(browser, setup):
    server = setup[0]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(f"localStorage.setItem('mlxfunKey', {json.dumps(KEY)})")
    page.goto(server.url + "/")
    page.wait_for_selector("#heatmap rect.cell")  # the live counters, once connected
    yield page
    page.close()


def _shot(page, name):
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def _load_file(page, stats):
    page.set_input_files("#upload", str(stats))
    page.wait_for_function("document.querySelector('#source').value === 'uploads/code.npz'")
    page.wait_for_function("document.querySelector('#legend').textContent.includes('tokens')")


def test_loads_a_stats_file_as_a_layers_by_experts_heatmap(page, setup):
    _load_file(page, setup[2])
    cells = page.locator("#heatmap rect.cell")
    assert cells.count() == 4 * 16
    layers = {cells.nth(i).get_attribute("data-layer") for i in range(cells.count())}
    assert layers == {"0", "1", "2", "3"}
    page.select_option("#scorer", "frequency")
    assert "frequency" in page.locator("#heatmap rect.cell title").first.text_content()


def test_model_wide_n8_highlights_8_cells_and_the_command_prunes_them(page, setup, tmp_path):
    server, model, _, workdir = setup
    _load_file(page, setup[2])
    page.check('input[name="mode"][value="model_wide"]')
    page.fill("#select-n", "8")
    page.click("#select")
    page.wait_for_function("document.querySelectorAll('#heatmap rect.cell.selected').length > 0")
    selected = page.locator("#heatmap rect.cell.selected")
    assert selected.count() == 8
    cells = sorted(
        (
            int(selected.nth(i).get_attribute("data-layer")),
            int(selected.nth(i).get_attribute("data-expert")),
        )
        for i in range(8)
    )
    assert page.locator("#impact tbody tr").count() == 4
    _shot(page, "tiny-model-wide.png")
    command = shlex.split(page.locator("#command").text_content())
    assert command[:2] == ["mlxfun", "prune"] and "--selector" in command
    out = tmp_path / "pruned"
    command[command.index("--output") + 1] = str(out)
    assert main(command[1:]) == 0
    removed = json.loads((out / "mlxfun.json").read_text())["removed"]
    assert sorted((int(layer), e) for layer, ids in removed.items() for e in ids) == cells


def test_a_chat_message_gets_an_answer(page, setup):
    page.click('nav button[data-tab="chat"]')
    page.fill("#chat-input", "Hello, who are you?")
    page.fill("#chat-max", "8")
    page.click("#chat-send")
    page.wait_for_selector(".answer[data-kind]")
    answer = page.locator(".answer[data-kind]").first.text_content()
    assert answer.startswith("answer") and len(answer) > len("answer")
    assert page.locator("#chat-heatmap rect.cell").count() == 4 * 16
    _shot(page, "tiny-chat.png")


def test_compare_rank_merges_two_files(page, setup):
    server, _, stats, workdir = setup
    uploads = workdir / "uploads"
    uploads.mkdir(exist_ok=True)
    shutil.copy(stats, uploads / "a.npz")
    shutil.copy(stats, uploads / "b.npz")
    page.click("#refresh")
    page.click('nav button[data-tab="compare"]')
    page.check('#compare-files input[value="uploads/a.npz"]')
    page.check('#compare-files input[value="uploads/b.npz"]')
    page.click("#merge")
    page.wait_for_function("document.querySelectorAll('#compare-maps figure').length === 3")
    assert (workdir / "merged.npz").is_file()
    _shot(page, "dashboard-compare.png")


def test_prune_job_from_the_dashboard_shows_progress_to_done(page, setup):
    _, _, stats, workdir = setup
    _load_file(page, stats)
    page.fill("#select-n", "2")
    page.fill("#job-output", "dash-pruned")
    page.click("#run-prune")
    page.wait_for_selector("#tab-jobs.active")
    page.wait_for_function(
        "[...document.querySelectorAll('#jobs td.state')].some(td => td.textContent === 'done')",
        timeout=120000,
    )
    assert (workdir / "dash-pruned" / "mlxfun.json").is_file()
    _shot(page, "dashboard-jobs.png")


def test_toggling_a_mask_changes_the_routing_counters(page, setup):
    import numpy as np

    server = setup[0]

    def ask():
        server.call("POST", "/v1/mlxfun/stats/reset", {})
        page.locator(".answer[data-kind]").evaluate_all("els => els.forEach(e => e.remove())")
        page.click("#chat-send")
        page.wait_for_selector(".answer[data-kind]")
        return np.array(server.call("GET", "/v1/mlxfun/stats")[1]["scores"]["frequency"])

    page.click('nav button[data-tab="chat"]')
    page.fill("#chat-input", "Tell me about rivers.")
    page.fill("#chat-max", "6")
    before = ask()
    expert = int(np.argmax(before[1]))  # the busiest expert of MoE layer 1
    assert before[1, expert] > 0
    page.select_option("#steer-layer", "1")
    page.fill("#steer-expert", str(expert))
    page.select_option("#steer-mode", "mask")
    page.click("#steer-add")
    page.click("#steer-apply")
    page.wait_for_function("document.querySelector('#message').textContent === 'steering applied'")
    assert server.call("GET", "/v1/mlxfun/steer")[1]["spec"]["rules"] == [
        {"layer": 1, "experts": [expert], "mode": "mask"}
    ]
    masked = ask()
    assert masked[1, expert] == 0 and masked[1].sum() == before[1].sum()
    page.check("#chat-compare")
    page.locator(".answer[data-kind]").evaluate_all("els => els.forEach(e => e.remove())")
    page.click("#chat-send")
    page.wait_for_selector('.answer[data-kind="unsteered"]')
    _shot(page, "tiny-steering.png")
    page.uncheck("#chat-compare")
    page.click("#steer-clear")
    page.wait_for_function("document.querySelector('#message').textContent === 'steering cleared'")
    assert page.locator("#steer-list li").count() == 0
    assert ask()[1, expert] > 0


def test_scan_report_shows_its_statistics_and_groups(page, setup):
    _, _, _, workdir = setup
    rows = [[float(e + 16 * layer) for e in range(16)] for layer in range(4)]
    report = {
        "format": 1,
        "scan": "safety-scan",
        "moe_layers": [0, 1, 2, 3],
        "num_experts": [16] * 4,
        "parts": {"prompt": {"risk_difference": rows}, "response": {"risk_difference": rows}},
        "groups": {
            "control": {
                "part": "response",
                "prefers": "harmful",
                "experts": {"1": [3, 9], "2": [], "3": [0]},
            }
        },  # fmt: skip
    }
    (workdir / "safety.json").write_text(json.dumps(report))
    page.click("#refresh")
    page.click('nav button[data-tab="reports"]')
    page.wait_for_function(
        "[...document.querySelectorAll('#report-file option')].some(o => o.value === 'safety.json')"
    )
    page.select_option("#report-file", "safety.json")
    page.wait_for_selector("#report-heatmap rect.cell")
    assert page.locator("#report-heatmap rect.cell").count() == 64
    page.select_option("#report-group", "control")
    assert page.locator("#report-heatmap rect.cell.selected").count() == 3
    _shot(page, "dashboard-report.png")
    page.click("#report-steer")
    assert page.locator("#steer-list li").count() == 3
