"""Sweeps and tables: experiment presets through Hydra multirun, parallel jobs, W&B offline runs,
and make_tables.py's Markdown / LaTeX against the CSV cells."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from rfc.reports.tables import COLUMNS, T2I_COLUMNS, fmt
from rfc.run.loggers import append_csv
from rfc.run.row import RunRecord
from scripts.make_tables import main as make_tables

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _md_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = [re.sub(r"\*\*|</?u>", "", c).removesuffix("x") for c in cells[1:]]
    return rows


def test_rfc_table1_on_the_tiny_model_and_its_tables(tmp_path):
    proc = _run(str(ROOT / "run.py"), "-m", "experiment=rfc_table1", "eval=smoke", "eval.num_samples=4",
                "eval.batch_size=4", "eval.warmup_batches=0",  # one timed pass per row: warm-up is tested elsewhere
                f"paths.runs_csv={tmp_path}/runs.csv", f"paths.outputs={tmp_path}/out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert len(rows) == 13 and {r["experiment"] for r in rows} == {"rfc_table1"}
    assert len({r["sweep"] for r in rows}) == 1
    nfc = {r["variant"]: float(r["nfc"]) for r in rows}
    assert nfc["Full compute"] == 50 and nfc["FORA N=4"] == 14 and nfc["ToCa N=4 R=0.07"] == 17
    assert [nfc[f"TaylorSeer N={n} m=2"] for n in (4, 5, 6, 7, 9)] == [14, 11, 10, 8, 7]
    for target in (14, 11, 10, 8, 7):  # calibrated on 64 seeds, evaluated on these 4: near, not exact
        assert abs(nfc[f"RFC m=2 NFC {target}"] - target) <= 2

    proc = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(tmp_path / "runs.csv"),
                "--out", str(tmp_path / "tables"))
    assert proc.returncode == 0, proc.stderr
    md = next((tmp_path / "tables").glob("rfc_table1_*.md"))
    tex = md.with_suffix(".tex")
    assert not list((tmp_path / "tables").glob("*.png"))  # quality-vs-speed plots are make_figures.py's
    table = _md_rows(md)
    full_latency = float(next(r for r in rows if r["method"] == "none")["latency_s"])
    for r in rows:
        shown = table[r["variant"]]
        for (_, col, _), text in zip(COLUMNS, shown, strict=True):
            if col == "speedup":
                expected = fmt(full_latency / float(r["latency_s"]))
            elif r["method"] == "none" and col in ("fid2fc", "sfid2fc"):
                expected = "-"
            else:
                expected = fmt(float(r[col])) if r[col] not in ("", None) else "-"
            assert text == expected, (r["variant"], col, text, expected)
    latex = tex.read_text()
    assert r"\begin{tabular}" in latex and latex.count(r"\\") >= 14 and r"\textbf{" in latex
    # the best fid2fc among cached rows is bold in both formats
    best = min((float(r["fid2fc"]), r["variant"]) for r in rows if r["method"] != "none")
    assert f"**{fmt(best[0])}**" in md.read_text() and rf"\textbf{{{fmt(best[0])}}}" in latex


def test_wandb_online_without_login_fails_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "logger=wandb", "logger.wandb.mode=online",
                           f"paths.outputs={tmp_path}/out"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "wandb login" in proc.stderr
    assert not list((tmp_path / "out").rglob("samples.npz"))


def test_tables_pick_the_latest_rerun_or_aggregate_over_seeds(tmp_path):
    path = tmp_path / "runs.csv"
    common = dict(experiment="exp", model="m", image_size=8, sampler="ddim", num_steps=50, cfg_scale=1.5,
                  num_samples=10, nfc=50.0)
    append_csv(path, RunRecord(time="2026-01-01T00:00:00", method="none", variant="Full", seed=0, latency_s=10.0,
                               fid=5.0, **common))
    append_csv(path, RunRecord(time="2026-01-01T00:01:00", method="none", variant="Full", seed=0, latency_s=8.0,
                               fid=4.0, **common))  # a rerun: the latest wins
    append_csv(path, RunRecord(time="2026-01-01T00:02:00", method="none", variant="Full", seed=1, latency_s=12.0,
                               fid=6.0, **common))
    latest = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(path), "--out", str(tmp_path / "a"))
    assert latest.returncode == 0, latest.stderr
    row = _md_rows(next((tmp_path / "a").glob("*.md")))["Full"]
    assert row[2] == "8" and row[4] == "4"  # seed 0, latest rerun
    agg = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(path), "--out", str(tmp_path / "b"),
               "--aggregate")
    assert agg.returncode == 0, agg.stderr
    row = _md_rows(next((tmp_path / "b").glob("*.md")))["Full"]
    assert row[4] == f"5 ± {fmt(math.sqrt(2))}"  # fid 4 and 6 over seeds 0 and 1


def test_speedup_is_against_the_tables_own_full_compute_row(tmp_path):
    """Two tables of one timing setting (here two experiments) each divide by their own
    full-compute latency, not by whichever full-compute row of that setting came last."""
    path = tmp_path / "runs.csv"
    common = dict(model="m", image_size=8, sampler="ddim", num_steps=50, cfg_scale=1.5, num_samples=10, seed=0)
    for i, (experiment, full, cached) in enumerate((("a", 10.0, 5.0), ("b", 20.0, 4.0))):
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{2 * i}:00", experiment=experiment, method="none",
                                   variant="Full", nfc=50.0, latency_s=full, **common))
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{2 * i + 1}:00", experiment=experiment, method="fora",
                                   variant="Cached", nfc=18.0, latency_s=cached, **common))
    proc = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(path), "--out", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    speedups = {md.name[0]: {k: v[3] for k, v in _md_rows(md).items()} for md in (tmp_path / "t").glob("*.md")}
    assert speedups == {"a": {"Full": "1", "Cached": "2"}, "b": {"Full": "1", "Cached": "5"}}


def test_aggregated_speedups_are_per_seed(tmp_path):
    """--aggregate divides each seed's latency by that seed's own full compute, then takes mean
    and std: full compute reads 1 ± 0, and a method's speedup is the mean of its per-seed ratios
    (not every seed against the latest seed's full compute)."""
    path = tmp_path / "runs.csv"
    common = dict(experiment="exp", model="m", image_size=8, sampler="ddim", num_steps=50, cfg_scale=1.5,
                  num_samples=10)
    timings = {0: (10.0, 5.0), 1: (12.0, 4.0), 2: (9.0, 6.0)}  # seed: (full, cached) latency
    for seed, (full, cached) in timings.items():
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{2 * seed}:00", method="none", variant="Full", nfc=50.0,
                                   seed=seed, latency_s=full, **common))
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{2 * seed + 1}:00", method="fora", variant="Cached",
                                   nfc=18.0, seed=seed, latency_s=cached, **common))
    proc = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(path), "--out", str(tmp_path / "t"),
                "--aggregate")
    assert proc.returncode == 0, proc.stderr
    rows = _md_rows(next((tmp_path / "t").glob("*.md")))
    ratios = [full / cached for full, cached in timings.values()]  # 2, 3, 1.5
    mean = sum(ratios) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    assert rows["Full"][3] == f"{fmt(1.0)}x ± {fmt(0.0)}"
    assert rows["Cached"][3] == f"{fmt(mean)}x ± {fmt(std)}"


def test_latex_is_a_styler_float_and_stale_pareto_plots_are_removed(tmp_path, capsys):
    """The .tex is pandas' Styler.to_latex float (booktabs rules, the caption as \\caption and as
    comments, labels escaped, best bold and second underlined as in the Markdown), and a
    <name>_pareto.png of an earlier version beside a regenerated table is deleted."""
    path = tmp_path / "runs.csv"
    common = dict(experiment="exp_1", model="m", image_size=8, sampler="ddim", num_steps=50, cfg_scale=1.5,
                  num_samples=10, seed=0)
    rows = (("none", "Full", 10.0, 5.0), ("fora", "FORA N_3 & co", 4.0, 7.0), ("taylorseer", "TS 50%", 5.0, 6.0))
    for i, (method, variant, latency, fid) in enumerate(rows):
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{i}:00", method=method, variant=variant, nfc=50.0 - 10 * i,
                                   latency_s=latency, fid=fid, **common))
    assert make_tables(["--csv", str(path), "--out", str(tmp_path / "t")]) == 0
    md = next((tmp_path / "t").glob("*.md"))
    stale = md.with_name(md.stem + "_pareto.png")
    stale.write_bytes(b"old")
    assert make_tables(["--csv", str(path), "--out", str(tmp_path / "t")]) == 0
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().out
    tex = md.with_suffix(".tex").read_text()
    assert tex.startswith("% exp_1: m 8px, DDIM-50") and r"\begin{table}" in tex and r"\caption{exp\_1: m 8px" in tex
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\end{table}" in tex
    assert r"Method & NFC & TFLOPs & Latency (s) & Speedup & FID & sFID & FID2FC & sFID2FC & IS \\" in tex
    assert r"FORA N\_3 \& co & 40 & - & \textbf{4} & \textbf{2.5x} & \underline{7} &" in tex
    assert r"TS 50\% & 30 & - & \underline{5} & \underline{2x} & \textbf{6} &" in tex
    assert _md_rows(md)["FORA N_3 & co"][:5] == ["40", "-", "4", "2.5", "7"]


def test_a_row_without_latency_joins_the_timing_run_of_its_exact_timing_setting(tmp_path):
    """A quality row that could not time itself takes the latency of the latest row of the same
    method and the same timing setting (here an eval=latency run: another sample count, so another
    table), marked with a dagger, and its speedup divides by its own table's full compute."""
    path = tmp_path / "runs.csv"
    common = dict(experiment="exp", model="m", image_size=8, sampler="ddim", num_steps=50, cfg_scale=1.5, seed=0,
                  batch_size=4, device="cpu (x86_64)", cpu_threads=2)
    append_csv(path, RunRecord(time="2026-01-01T00:00:00", method="fora", variant="FORA", num_samples=8, nfc=18.0,
                               latency_s=4.0, **common))  # the timing run
    append_csv(path, RunRecord(time="2026-01-01T00:01:00", method="none", variant="Full", num_samples=100, nfc=50.0,
                               latency_s=10.0, fid=5.0, **common))
    append_csv(path, RunRecord(time="2026-01-01T00:02:00", method="fora", variant="FORA", num_samples=100, nfc=18.0,
                               fid=6.0, **common))  # no latency of its own
    assert make_tables(["--csv", str(path), "--out", str(tmp_path / "t")]) == 0
    table = _md_rows(next(p for p in (tmp_path / "t").glob("*.md") if "_n100_" in p.name))
    assert table["FORA"][2:4] == ["4\u2020", "2.5"] and table["Full"][2:4] == ["10", "1"]


# ---- text-to-image rows: RFC's Table 2 layout --------------------------------------------------

T2I_HEADER = "| Method | NFC | FLOPs (T) | Latency (s) | Speedup | PSNR | SSIM | LPIPS | ImageReward | CLIP |"


def _t2i_csv(path: Path) -> None:
    """A FLUX-like table: full compute, two cached methods with every metric, one without
    ImageReward (notes say why), one not timed; plus a class-conditional row and a second prompt set."""
    common = dict(experiment="rfc_table2", model="flux-tiny", image_size=64, sampler="flow_euler", num_steps=50,
                  cfg_scale=3.5, num_samples=8, seed=0, batch_size=4, prompts="drawbench200:sha256:0123abcd")
    rows = [
        RunRecord(time="2026-01-01T00:00:00", method="none", variant="Full compute", nfc=50.0, tflops=3719.48,
                  latency_s=10.0, image_reward=1.0, clip_score=31.5, notes="paired metrics missing: reference run",
                  **common),
        RunRecord(time="2026-01-01T00:01:00", method="fora", variant="FORA N=3", nfc=17.0, tflops=1264.6,
                  latency_s=4.0, psnr=28.0, ssim=0.80, lpips=0.30, image_reward=0.90, clip_score=31.0,
                  notes="paired with /x", **common),
        RunRecord(time="2026-01-01T00:02:00", method="taylorseer", variant="TaylorSeer N=4 m=2", nfc=14.0,
                  tflops=1041.5, latency_s=5.0, psnr=31.0, ssim=0.85, lpips=0.20, clip_score=31.2,
                  notes="paired with /x; image_reward missing: image-reward is not installed", **common),
        RunRecord(time="2026-01-01T00:03:00", method="toca", variant="ToCa N=5", nfc=12.0, tflops=900.0,
                  psnr=25.0, ssim=0.70, lpips=0.40, image_reward=0.80, clip_score=30.0,
                  notes="latency not measured: another job used cuda:0", **common),
        RunRecord(time="2026-01-01T00:04:00", method="none", variant="Full compute", nfc=50.0, latency_s=10.0,
                  clip_score=30.0, **{**common, "prompts": "parti:sha256:ffff"}),
        RunRecord(time="2026-01-01T00:05:00", experiment="rfc_table1", model="m", image_size=8, sampler="ddim",
                  num_steps=50, cfg_scale=1.5, num_samples=10, seed=0, method="none", variant="Full", nfc=50.0,
                  latency_s=10.0, fid=5.0),
    ]
    for r in rows:
        append_csv(path, r)


def test_text_to_image_rows_in_table2_layout(tmp_path):
    _t2i_csv(tmp_path / "runs.csv")
    assert make_tables(["--csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "t")]) == 0
    mds = sorted((tmp_path / "t").glob("*.md"))
    t2i = [md for md in mds if T2I_HEADER in md.read_text()]
    assert len(mds) == 3 and len(t2i) == 2  # one table per prompt set, the class-conditional one apart
    dit = next(md for md in mds if md not in t2i)
    assert "| Method | NFC | TFLOPs | Latency (s) | Speedup | FID |" in dit.read_text()
    md = next(md for md in t2i if "drawbench200" in md.read_text())
    text = md.read_text()
    table = _md_rows(md)
    assert list(table) == ["Full compute", "FORA N=3", "TaylorSeer N=4 m=2", "ToCa N=5"]
    assert [h for h, _, _ in T2I_COLUMNS] == T2I_HEADER.strip("| ").split(" | ")[1:]
    assert table["Full compute"] == ["50", "3719", "10", "1", "-", "-", "-", "1", "31.5"]
    assert table["FORA N=3"] == ["17", "1265", "4", "2.5", "28", "0.8", "0.3", "0.9", "31"]
    assert table["TaylorSeer N=4 m=2"] == ["14", "1042", "5", "2", "31", "0.85", "0.2", "missing", "31.2"]
    assert table["ToCa N=5"] == ["12", "900", "missing", "missing", "25", "0.7", "0.4", "0.8", "30"]
    # best / second of each ranked column among the cached rows
    assert "**31**" in text and "<u>28</u>" in text and "**0.2**" in text and "**2.5x**" in text
    caption = text.split("| Method")[0]
    assert "drawbench200:sha256:0123abcd" in caption and "sample i from prompt i" in caption
    assert "Missing (TaylorSeer N=4 m=2): image_reward missing: image-reward is not installed." in caption
    assert "Missing (ToCa N=5): latency not measured: another job used cuda:0." in caption
    assert "reference run" not in caption  # the full row's paired cells are its reference, not missing
    tex = md.with_suffix(".tex").read_text()
    assert r"ImageReward & CLIP \\" in tex and r"\textbf{31}" in tex
    assert (r"TaylorSeer N=4 m=2 & 14 & 1042 & \underline{5} & \underline{2x} & \textbf{31} & \textbf{0.85} & "
            r"\textbf{0.2} & missing & \textbf{31.2} \\") in tex
    assert not any(re.fullmatch(r"0(\.0+)?", c) for row in table.values() for c in row)


def test_rfc_table2_sweep_composes_every_variant():
    """The experiment's 13 variants compose with their method keys, and RFC's calibrated tau is
    looked up per order (m=1 and m=2 are calibrated apart)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rfc.run.config import register_resolvers, tau_key

    register_resolvers()
    expected = {
        "flux_full": ("rfc.cache.NoCache", {}, "Full compute"),
        "flux_fora3": ("baselines.fora.FORA", {"interval": 3}, "FORA N=3"),
        "flux_fora7": ("baselines.fora.FORA", {"interval": 7}, "FORA N=7"),
        "flux_toca5": ("baselines.toca.ToCa", {"interval": 5, "fresh_ratio": 0.1}, "ToCa N=5"),
        "flux_toca12": ("baselines.toca.ToCa", {"interval": 12, "fresh_ratio": 0.1}, "ToCa N=12"),
        **{f"flux_ts{n}_m{m}": ("baselines.taylorseer.TaylorSeer", {"interval": n, "order": m, "warmup": 3},
                                f"TaylorSeer N={n} m={m}") for n in (4, 9) for m in (1, 2)},
        **{f"flux_rfc{t}_m{m}": ("rfc.method.RFC", {"order": m}, f"RFC m={m} NFC {t}")
           for t in (14, 8) for m in (1, 2)},
    }
    GlobalHydra.instance().clear()
    keys = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        sweep = compose("run", overrides=["experiment=rfc_table2"], return_hydra_config=True)
        assert sweep.experiment_name == "rfc_table2" and sweep.model.name == "dit-tiny"  # model: the user's choice
        variants = sweep.hydra.sweeper.params["+variant"].split(",")
        assert variants == list(expected)  # full compute first: the others pair with it
        for variant in variants:
            cfg = compose("run", overrides=["experiment=rfc_table2", f"+variant={variant}"])
            target, params, name = expected[variant]
            assert cfg.method._target_ == target and cfg.variant_name == name, variant
            assert {k: cfg.method[k] for k in params} == params, variant
            if target == "rfc.method.RFC":
                t = int(variant.split("_")[1].removeprefix("rfc"))
                assert cfg.method._get_node("tau")._value() == f"${{calibrated_tau:{t}}}"
                keys[variant] = tau_key(cfg, t)
    GlobalHydra.instance().clear()
    assert len(set(keys.values())) == 4


def test_make_tables_is_strict_about_its_csv(tmp_path):
    """An empty CSV and text in a numeric cell end in one line naming the file (and the run and
    column), exit 2, no table; a numeric cell is never shown as a silent '-'."""
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    proc = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(empty), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and f"{empty} is empty" in proc.stderr and "Traceback" not in proc.stderr
    path = tmp_path / "runs.csv"
    append_csv(path, RunRecord(run_id="r1", method="none", model="m", variant="Full", nfc=50.0, fid=3.0))
    text = path.read_text().replace(",3.0,", ",abc,", 1)
    path.write_text(text)
    proc = _run(str(ROOT / "scripts" / "make_tables.py"), "--csv", str(path), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "run r1: column fid holds 'abc', not a number" in proc.stderr
    assert not (tmp_path / "b").exists()
