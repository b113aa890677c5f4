"""Regression tests of the CLI audit fixes (/tmp/review_cli/REPORT.md): bad input is refused in one line naming the
option, with exit code 2, before any long work; results files are replaced only by complete runs.

Most tests call ``ditlab.cli.main`` in-process (seconds, not a subprocess per case); ``one_line_error`` checks the
message the user sees."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ditlab import cli

ROOT = Path(__file__).resolve().parent.parent


def call(*args: str, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m ditlab ARGS`` run in this process."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *args: str) -> str:
    """Runs the command, asserts exit code 2 and exactly one stderr line without a traceback; returns that line."""
    code, _, err = call(*args, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- 1. bench: every setting is checked before any work; results files are replaced only when complete -------------
def test_a_typo_in_presets_is_refused_before_any_measurement(tmp_path, capsys, monkeypatch):
    from ditlab.results import common

    monkeypatch.setattr(common, "evaluate_row", lambda *a, **k: pytest.fail("measured before the presets were checked"))
    line = one_line_error(capsys, "bench", "quality", "--presets", "w8a8-rtn,typo", "--docs", str(tmp_path))
    assert "--presets = 'typo'" in line and "w8a8-rtn" in line
    assert not (tmp_path / "results" / "quality.json").exists()


def test_a_failed_run_keeps_the_complete_results_file(tmp_path, monkeypatch):
    from ditlab import results
    from ditlab.results import quality

    results_dir = tmp_path / "results"
    results_dir.mkdir()
    complete = {"part": "quality", "complete": True, "data": {"rows": []}}
    (results_dir / "quality.json").write_text(json.dumps(complete))
    calls = []

    def row(pipe, name, settings):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return {"recipe": name, "psnr": None, "class_acc": None, "ratio_fp16": None, "seconds_quantize": 0.0, "seconds_sample": 0.0}

    monkeypatch.setattr(quality, "evaluate_row", row)
    with pytest.raises(RuntimeError):
        results.run("quality", results.ResultsSettings(presets=("fp", "w8a8-rtn")), docs_dir=tmp_path, say=lambda _: None)
    assert json.loads((results_dir / "quality.json").read_text()) == complete
    partial = json.loads((results_dir / "quality.partial.json").read_text())
    assert not partial["complete"] and [r["recipe"] for r in partial["data"]["rows"]] == ["fp"]


def test_results_documents_are_readable_by_everyone(tmp_path):
    from ditlab.results.common import write_doc

    path = write_doc(tmp_path, {"part": "quality", "data": {}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("args,needle", [
    (["--n-per-label", "0"], "--n-per-label"),
    (["--act-steps", "0"], "--act-steps"),
    (["--calib-samples", "-1"], "--calib-samples"),
    (["--vq-params", "5"], "--vq-params: '5' is not a JSON object"),
    (["--vq-params", "{bad"], "--vq-params: '{bad' is not valid JSON"),
    (["--pareto-measure", "abc"], "--pareto-measure: 'abc' is not a comma-separated list of numbers"),
])
def test_bench_values_are_checked_by_the_parser(args, needle, capsys):
    assert needle in one_line_error(capsys, "bench", "act", *args)


@pytest.mark.parametrize("docs,needle", [("/proc/nope", "a writable folder"), (__file__, "this is a file")])
def test_bench_docs_must_be_a_writable_folder(docs, needle, capsys):
    line = one_line_error(capsys, "bench", "report", "--docs", docs)
    assert line.startswith("ditlab bench: error: --docs = ") and needle in line


@pytest.mark.parametrize("args,needle", [
    (["sampling", "--n-per-label", "1"], "--n-per-label is not used by `bench sampling`"),
    (["kernels", "--model", "x"], "--model is not used by `bench kernels`"),
    (["quality", "--out", "x.md"], "--out is not used by `bench quality`; it is used by: sampling, kernels"),
    (["sampling", "--out", "/proc/x.md"], "--out = '/proc/x.md'"),
])
def test_bench_refuses_options_a_part_ignores(args, needle, capsys):
    assert needle in one_line_error(capsys, "bench", *args)


def test_bench_kernels_honours_its_options(tmp_path, capsys):
    out = tmp_path / "k.md"
    code, stdout, _ = call("bench", "kernels", "--kernel-m", "8", "--kernel-repeats", "1", "--out", str(out), capsys=capsys)
    assert code == 0 and "--m 8 --repeats 1" in stdout and "--m 8 --repeats 1" in out.read_text()


# ---- 2. train: counts, --only dit and --out are checked before the data is generated -------------------------------
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training would start (the data generation is its first step)."""
    from ditlab import data

    monkeypatch.setattr(data, "make_dataset", lambda *a, **k: pytest.fail("data generated before the arguments were checked"))


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_train_refuses_steps_below_1(steps, tmp_path, capsys, no_training):
    assert "argument --steps" in one_line_error(capsys, "train", "--steps", steps, "--out", str(tmp_path))


def test_train_only_dit_needs_the_classifier_first(tmp_path, capsys, no_training):
    line = one_line_error(capsys, "train", "--only", "dit", "--out", str(tmp_path / "new"))
    assert "--only = 'dit'" in line and "metrics.json is missing" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out,needle", [("/proc/x", "a writable folder"), (__file__, "this is a file")])
def test_train_out_must_be_writable(out, needle, capsys, no_training):
    line = one_line_error(capsys, "train", "--only", "classifier", "--out", out)
    assert "--out = " in line and needle in line


def test_train_config_is_checked_by_the_library(tmp_path, no_training):
    from ditlab.errors import ConfigError
    from ditlab.train import TrainConfig, train_all

    with pytest.raises(ConfigError, match="steps = 0"):
        train_all(tmp_path, TrainConfig(steps=0))


# ---- 3. output paths, cache and docs folders: one line naming the option, before any work --------------------------
@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if a model would be quantized or sampled."""
    from ditlab import api

    monkeypatch.setattr(api, "generate", lambda *a, **k: pytest.fail("sampled before the arguments were checked"))
    monkeypatch.setattr(api, "quantize", lambda *a, **k: pytest.fail("quantized before the arguments were checked"))


@pytest.mark.parametrize("out,needle", [
    ("/tmp", "(this is a folder)"), ("x.txt", "a .png or .jpg or .jpeg or .webp file path"), ("noext", "file path"),
    ("", "(not empty)"), ("/proc/x.png", "a file in a writable folder"),
])
def test_sample_out_is_checked_first(out, needle, capsys, no_sampling):
    line = one_line_error(capsys, "sample", "--n-per-label", "1", "--steps", "2", "--out", out)
    assert line.startswith("ditlab sample: error: --out = ") and needle in line


@pytest.mark.parametrize("args,needle", [
    (["allocate", "--budget-bits", "5", "--out", "/tmp"], "--out = '/tmp'"),
    (["allocate", "--budget-bits", "5", "--out", "/proc/x.json"], "--out = '/proc/x.json'"),
    (["sensitivity", "--cache-dir", "/proc/nope"], "--cache-dir = '/proc/nope'"),
    (["sensitivity", "--cache-dir", __file__], "(this is a file)"),
])
def test_analysis_outputs_are_checked_first(args, needle, capsys, no_sampling):
    assert needle in one_line_error(capsys, *args)


def test_allocate_out_creates_parent_folders(tmp_path):
    from ditlab.allocation import _save_recipe
    from ditlab.config import load_recipe

    out = tmp_path / "new" / "deeper" / "alloc.json"
    _save_recipe(load_recipe("w4a8-rtn"), str(out))
    assert load_recipe(str(out)).name == "w4a8-rtn"


# ---- 4. the analysis commands refuse a QDIR (they measure an FP model) ---------------------------------------------
@pytest.fixture
def fake_qdir(tmp_path) -> str:
    """A folder that is_qdir() recognises (the refusal must come before loading it)."""
    from ditlab.qdir import MANIFEST

    (tmp_path / MANIFEST).write_text("{}")
    return str(tmp_path)


@pytest.mark.parametrize("args", [["sensitivity"], ["allocate", "--budget-bits", "5"], ["outliers"], ["calibrate"]])
def test_analysis_commands_refuse_a_qdir(args, fake_qdir, capsys, no_sampling):
    line = one_line_error(capsys, *args, "--model", fake_qdir)
    assert "--model = " in line and "not a QDIR" in line and "FP model" in line


def test_sensitivity_library_refuses_a_quantized_pipeline():
    from types import SimpleNamespace

    from ditlab.errors import ConfigError
    from ditlab.sensitivity import _refuse_quantized

    with pytest.raises(ConfigError, match="not a QDIR"):
        _refuse_quantized(SimpleNamespace(transformer=SimpleNamespace(ditlab_recipe="w8a8"), source="q"))


def test_allocate_refuses_an_impossible_budget_before_measuring(capsys, no_sampling):
    line = one_line_error(capsys, "allocate", "--budget-bits", "3", "--w-bits", "4,8")
    assert "budget_bits = 3.0" in line and "a number from 4 to 16" in line and "HiGHS" not in line
    for bad in ("nan", "1"):  # one range, the same words for every out-of-range budget
        assert "a number from 4 to 16" in one_line_error(capsys, "allocate", "--budget-bits", bad, "--w-bits", "4,8")


def test_quantize_refuses_an_empty_out(capsys, no_sampling):
    assert "--out = '' is not allowed; allowed: a folder path" in one_line_error(capsys, "quantize", "--recipe", "w8a8-rtn", "--out", "")


def test_outliers_offers_both_branches_pooled_as_the_app_does():
    from ditlab.cli import parse_args

    assert parse_args(["outliers", "--branch", "all"]).branch == "all"


# ---- 10, 11, 13. sample/eval: labels named once and checked before quantizing; QDIR metadata; the image cap ------
@pytest.mark.parametrize("labels,shown", [("99", "--labels = 99 is"), ("99,98,3", "--labels = [98, 99] is")])
def test_sample_labels_are_checked_before_quantizing(labels, shown, capsys, no_sampling):
    assert shown in one_line_error(capsys, "sample", "--recipe", "w4a16-gptq", "--labels", labels, "--steps", "2")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_n_per_label_is_capped(command, capsys, no_sampling):
    assert "argument --n-per-label: 101 is more than 100" in one_line_error(capsys, command, "--n-per-label", "101")


# ---- 5, 6, 7. broken pipes, the --overwrite hint, parser errors named by their subcommand ---------------------------
def test_a_closed_stdout_pipe_is_not_a_traceback():
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ditlab", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    proc.stdout.close()  # like `| head` exiting before the table is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_existing_qdir_message_names_the_real_flag(tmp_path):
    from ditlab.qdir import MANIFEST, _place

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / MANIFEST).write_text("{}")
    (tmp_path / "new").mkdir()
    with pytest.raises(Exception, match=r"\(CLI: --overwrite\)"):
        _place(tmp_path / "new", tmp_path / "q", overwrite=False)


@pytest.mark.parametrize("args,prefix", [
    (["info", "--bogus"], "ditlab info: error: unrecognized arguments: --bogus"),
    (["allocate", "--budget-bits", "5", "--unit", "group"], "ditlab allocate: error: unrecognized arguments: --unit group"),
    ([], "ditlab: error: the following arguments are required: command"),
    (["sample", "--steps", "x"], "ditlab sample: error: argument --steps"),
])
def test_parser_errors_name_the_subcommand(args, prefix, capsys):
    assert one_line_error(capsys, *args).startswith(prefix)


def test_verbose_also_after_the_subcommand():
    assert cli.parse_args(["info", "-v"]).verbose and not cli.parse_args(["info"]).verbose


# ---- 9, 11. a QDIR records a source valid from any folder; sample/eval report the QDIR -----------------------------
@pytest.fixture(scope="module")
def qdir_w8a8(tmp_path_factory) -> Path:
    """A w8a8-rtn QDIR of the shipped model, quantized from the relative path a user in the checkout would type."""
    from ditlab import api

    out = tmp_path_factory.mktemp("qdir") / "w8a8"
    old = Path.cwd()
    os.chdir(ROOT)
    try:
        pipe = api.load("assets/tiny-dit")
        api.save(api.quantize(pipe, "w8a8-rtn", progress=False), pipe, out)
    finally:
        os.chdir(old)
    return out


def _manifest(qdir: Path) -> dict:
    from ditlab.qdir import MANIFEST

    return json.loads((qdir / MANIFEST).read_text())


def test_qdir_records_the_shipped_model_portably(qdir_w8a8):
    assert _manifest(qdir_w8a8)["source"] == "shipped"


def test_old_qdir_with_a_relative_source_loads_from_any_folder(qdir_w8a8, tmp_path, monkeypatch):
    from ditlab.qdir import MANIFEST, fp_source

    old = tmp_path / "old"
    import shutil

    shutil.copytree(qdir_w8a8, old)
    manifest = {**_manifest(old), "source": "assets/tiny-dit"}  # what QDIRs made in the checkout recorded before
    (old / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    assert fp_source(old) == "shipped"
    manifest["source"] = "models/gone"
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert fp_source(old) == "models/gone"  # unknown: returned as recorded (a hub id), the CLI names it on failure


def test_sample_and_eval_report_the_qdir(qdir_w8a8, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the recorded source must not depend on it
    code, out, err = call("sample", "--model", str(qdir_w8a8), "--labels", "0", "--n-per-label", "1", "--steps", "2",
                          "--out", str(tmp_path / "g.png"), capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["recipe"] == "w8a8-rtn"
    code, out, err = call("eval", "--model", str(qdir_w8a8), "--n-per-label", "1", "--steps", "2", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(qdir_w8a8) and result["fp_model"] == "shipped"


# ---- 10, 12. the option is named, and options that would be ignored or clamped are refused ---------------------------
@pytest.fixture
def truncated_recipe(tmp_path) -> str:
    path = tmp_path / "truncated.json"
    path.write_text('{"version": 1, "name": "x", "default": {"method": "rtn"')
    return str(path)


@pytest.mark.parametrize("command", [["sample"], ["eval"], ["quantize", "--out", "/tmp/never-written"]])
def test_a_truncated_recipe_names_the_file_and_the_json_error(command, truncated_recipe, capsys, no_sampling):
    line = one_line_error(capsys, *command, "--recipe", truncated_recipe)
    assert f"--recipe '{truncated_recipe}'" in line and "recipe JSON" in line and "line 1 col" in line and "Expecting" in line


@pytest.mark.parametrize("args,needle", [
    (["sensitivity", "--layers", ","], "--layers = ','"),
    (["sensitivity", "--groups", "5", "--steps", "2"], "--groups = 5 is not allowed; allowed: at most --steps (2)"),
    (["sensitivity", "--setting", "typo"], "--setting = 'typo'"),
    (["outliers", "--timestep", "499"], "--timestep 499 is used only by the layer view"),
    (["outliers", "--metric", "absmax", "--layer", "transformer_blocks.2.ff.net.2"], "--metric absmax is used only by the model-wide map"),
    (["info", "--model", ""], "--model = ''"),
    (["info", "--model", " "], "--model = ' '"),
])
def test_ignored_or_clamped_options_are_refused_by_name(args, needle, capsys, no_sampling):
    assert needle in one_line_error(capsys, *args)


# ---- 14. docs: RESULTS.md is what `bench report` generates (with the corrected 3-bit VQ sentence); help defaults ------
def test_results_md_is_regenerated_with_the_packed_vq_sentence(tmp_path):
    import shutil

    from ditlab.results import report

    shutil.copytree(ROOT / "docs" / "results", tmp_path / "results")
    path = report.assemble(tmp_path, tmp_path / "results")
    text = path.read_text()
    assert "6-bit indices packed four in three bytes" in text and "stored in a byte" not in text

    def without_figure_note(doc: str) -> str:  # without matplotlib (not a test extra) the report links no figures and says so
        return "\n".join(line for line in doc.splitlines() if line.strip() and not line.startswith(("*Figures not rendered", "![")))

    assert without_figure_note(text) == without_figure_note((ROOT / "docs" / "RESULTS.md").read_text())


@pytest.mark.parametrize("command,defaults", [("sample", ["(default 8)", "(default 0)"]), ("eval", ["(default 10)", "(default 0)"])])
def test_sampling_help_states_the_defaults(command, defaults):
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    helps = {a.dest: a.help for a in sub._actions}
    assert defaults[0] in helps["n_per_label"] and defaults[1] in helps["seed"]


@pytest.mark.parametrize("args,needle", [
    (["sample", "--cfg", "51"], "argument --cfg: 51 is not a number from 0 to 50"),
    (["eval", "--cfg", "nan"], "argument --cfg: nan"),
    (["sample", "--seed", "-1"], "argument --seed: -1 is not an integer from 0 to"),
    (["bench", "quality", "--guidance", "99"], "argument --guidance: 99"),
])
def test_cfg_and_seed_are_named_by_their_option(args, needle, capsys, no_sampling):
    assert needle in one_line_error(capsys, *args)
