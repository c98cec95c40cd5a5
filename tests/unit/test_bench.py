"""scripts/bench.py's pure parts: the FLOP count against hand-worked numbers, the summary and the report writer."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"
spec = importlib.util.spec_from_file_location("bench", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench  # dataclasses look their module up while the script is executed
spec.loader.exec_module(bench)

VOCAB = 104  # the embedded character tokenizer: 7 special tokens, 95 printable characters, newline and tab


def test_matmul_params_of_the_embedded_model():
    w = bench.Workload()  # hidden 128, 4 layers, MLP 384
    per_layer = 4 * 128 * 128 + 3 * 128 * 384  # q, k, v, o + gate, up, down = 65,536 + 147,456
    assert bench.matmul_params(w, VOCAB) == 4 * per_layer + 128 * 104 == 865_280
    assert bench.matmul_params(w, 1) == 851_968 + 128


def test_forward_flops_by_hand():
    # 2 x 865,280 weights x 10 tokens = 17,305,600; attention: 2 x 2 x 128 x 4 layers x (1 + ... + 10 = 55) = 112,640
    assert bench.forward_flops(865_280, 4, 128, 10) == 17_305_600 + 112_640


def test_step_flops_by_stage():
    w = bench.Workload(batch=4, prompts=2, group=3, prompt_len=6, response_len=9, kl_coef=0.1)
    lm, rm = bench.matmul_params(w, VOCAB), bench.matmul_params(w, 1)

    def fwd(params, n):
        return bench.forward_flops(params, 4, 128, n)

    assert bench.step_flops("sft", w, VOCAB, 10) == {"train": 3 * 4 * fwd(lm, 16)}
    assert bench.step_flops("train-rm", w, VOCAB, 10) == {"train": 3 * 8 * fwd(rm, 16)}
    # DPO: 4 pairs, both responses through the policy (forward + backward) and through the reference (forward)
    assert bench.step_flops("dpo", w, VOCAB, 10) == {"logprob": 8 * fwd(lm, 16), "train": 3 * 8 * fwd(lm, 16)}
    grpo = bench.step_flops("grpo", w, VOCAB, 4.0)  # 6 samples of 6 + 4 tokens
    assert grpo == {"generate": 6 * fwd(lm, 10), "logprob": 6 * fwd(lm, 10), "train": 18 * fwd(lm, 10)}
    ppo = bench.step_flops("ppo", w, VOCAB, 4.0)
    assert ppo["logprob"] == 6 * (2 * fwd(lm, 10) + fwd(rm, 10))  # old and reference log-probs, values
    assert ppo["train"] == 18 * (fwd(lm, 10) + fwd(rm, 10))
    no_kl = bench.Workload(prompts=2, group=3, kl_coef=0.0)
    assert bench.step_flops("grpo", no_kl, VOCAB, 4.0)["logprob"] == 0.0


def test_summary_leaves_out_the_warm_up_and_splits_the_step():
    w = bench.Workload(prompts=2, group=4, prompt_len=6, warmup=1)
    rows = [{"time/step_s": 9.0, "time/generate_s": 9.0, "response/length_mean": 1.0},
            {"time/step_s": 2.0, "time/generate_s": 1.0, "time/logprob_s": 0.25, "time/reward_s": 0.05,
             "time/train_s": 0.5, "response/length_mean": 4.0}]
    r = bench.summarise("grpo", "ours", rows, w, VOCAB, peak_flops=1e9)
    assert r["steps_timed"] == 1 and r["step_s"] == 2.0
    assert r["samples_per_s"] == 8 / 2.0
    assert r["gen_tokens_per_s"] == 8 * 4.0 / 1.0
    assert r["train_tokens_per_s"] == 8 * 10.0 / 0.5
    assert r["phase_s"]["other"] == pytest.approx(0.2)
    flops = bench.step_flops("grpo", w, VOCAB, 4.0)
    assert r["mfu"] == pytest.approx(sum(flops.values()) / 2.0 / 1e9)
    sft = bench.summarise("sft", "trl", [{"time/step_s": 0.5}], w, VOCAB, peak_flops=1e9)
    assert sft["phase_s"]["train"] == 0.5 and sft["gen_tokens_per_s"] is None
    assert r["floor_s"] is None and r["step_over_floor"] is None


def test_dpo_counts_pairs_and_both_responses_tokens():
    w = bench.Workload(batch=4, prompt_len=6, response_len=9, warmup=0)
    r = bench.summarise("dpo", "ours", [{"time/step_s": 0.5}], w, VOCAB, peak_flops=1e9,
                        rates={"forward": 1e9, "train": 2e9})
    assert r["samples_per_s"] == 4 / 0.5 and r["train_tokens_per_s"] == 2 * 4 * (6 + 10) / 0.5
    flops = bench.step_flops("dpo", w, VOCAB, 10)
    assert r["floor_s"] == pytest.approx(flops["logprob"] / 1e9 + flops["train"] / 2e9)


def test_floor_counts_training_at_its_own_rate_and_every_other_phase_at_the_forward_rate():
    flops = {"generate": 3e9, "logprob": 1e9, "train": 12e9}
    assert bench.floor_s(flops, {"forward": 2e9, "train": 4e9}) == 3 / 2 + 1 / 2 + 12 / 4
    w = bench.Workload(prompts=2, group=4, prompt_len=6, warmup=0)
    rows = [{"time/step_s": 2.0, "time/generate_s": 1.0, "time/train_s": 0.5, "response/length_mean": 4.0}]
    r = bench.summarise("grpo", "ours", rows, w, VOCAB, peak_flops=1e9, rates={"forward": 1e9, "train": 1e9})
    assert r["floor_s"] == pytest.approx(sum(bench.step_flops("grpo", w, VOCAB, 4.0).values()) / 1e9)
    assert r["step_over_floor"] == pytest.approx(2.0 / r["floor_s"])


def test_model_rates_of_a_saved_model(tmp_path):
    w = bench.Workload(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch=2, prompts=1, group=2,
                       prompt_len=6, response_len=4, steps=1)
    inputs = bench.write_inputs(tmp_path, w)
    rates = bench.model_rates(inputs["model"], w, inputs["vocab"], "cpu", repeats=1)
    assert rates["forward"] > 0 and rates["train"] > 0
    from transformers import AutoTokenizer

    assert inputs["vocab"] == len(AutoTokenizer.from_pretrained(inputs["model"]))  # no padding asked for


def test_vocab_size_pads_the_model_beyond_the_tokenizer(tmp_path):
    from transformers import AutoConfig

    w = bench.Workload(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch=2, prompts=1, group=2,
                       prompt_len=6, response_len=4, steps=1, vocab_size=1000)
    inputs = bench.write_inputs(tmp_path, w)
    assert inputs["vocab"] == 1000 == AutoConfig.from_pretrained(inputs["model"]).vocab_size


def test_step_rows_skip_evaluation_rows(tmp_path):
    lines = [{"step": 1, "time/step_s": 1.0, "samples_seen": 4}, {"step": 1, "time/step_s": 3.0, "eval/loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bench.step_rows(tmp_path / "metrics.jsonl") == lines[:1]
    assert bench.step_rows(tmp_path / "missing.jsonl") == []


def test_synthetic_rows_have_exact_lengths():
    w = bench.Workload(prompt_len=9, response_len=5)
    rows = bench.synthetic_rows(3, w)
    assert all(len(r["prompt"]) == 9 and r["prompt"].endswith("=") for r in rows["prompts"])
    assert all(len(r["completion"]) == 5 for r in rows["sft"])
    assert all(len(r["chosen"]) == len(r["rejected"]) == 5 for r in rows["prefs"])
    a, b = rows["prompts"][0]["prompt"].lstrip("0").rstrip("=").split("+")
    assert rows["prompts"][0]["answer"] == str(int(a) + int(b))


def test_synthetic_rows_spread_in_length():
    w = bench.Workload(prompt_len=9, response_len=40, response_len_min=8)
    lengths = [len(r[k]) for r in bench.synthetic_rows(200, w)["prefs"] for k in ("chosen", "rejected")]
    assert min(lengths) >= 8 and max(lengths) <= 40 and len(set(lengths)) > 20
    assert w.supervised_response_len == 25
    assert bench.step_flops("train-rm", w, 64, w.supervised_response_len)["train"] == \
        bench.step_flops("train-rm", bench.Workload(prompt_len=9, response_len=24), 64, 25)["train"]

    prompts = [len(r["prompt"]) for r in bench.synthetic_rows(200, bench.Workload(prompt_len=24, prompt_len_min=6))["sft"]]
    assert min(prompts) >= 6 and max(prompts) <= 24 and len(set(prompts)) > 10
    mixed = bench.Workload(prompt_len=24, prompt_len_min=6, response_len=20)
    assert mixed.mean_prompt_len == 15
    assert bench.step_flops("sft", mixed, 64, 21)["train"] == \
        bench.step_flops("sft", bench.Workload(prompt_len=15, response_len=20), 64, 21)["train"]


def test_report_and_ratios(tmp_path):
    ours = {"stage": "grpo", "impl": "ours", "samples_per_s": 4.0, "gen_tokens_per_s": 10.0, "train_tokens_per_s": 8.0,
            "peak_rss_mb": 600.0, "mfu": 0.02, "step_s": 2.0,
            "phase_s": {"generate": 1.0, "logprob": 0.2, "reward": 0.1, "train": 0.6, "other": 0.1}}
    trl = {**ours, "impl": "trl", "samples_per_s": 2.0, "peak_rss_mb": 800.0, "mfu": 0.01, "step_s": 4.0}
    failed = {"stage": "ppo", "impl": "ours", "error": "exit code 1"}
    ratio = bench.ratios([ours, trl, failed])
    assert ratio == {"grpo": {"samples_per_s": 2.0, "gen_tokens_per_s": 1.0, "train_tokens_per_s": 1.0,
                              "peak_rss_mb": 0.75, "mfu": 2.0}}
    table = bench.write_report(tmp_path, {"results": [ours, trl, failed], "ratios": ratio})
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == ratio and (tmp_path / "bench.md").read_text() == table + "\n"
    assert "| grpo | ours | 4 |" in table and "failed: exit code 1" in table
    assert "| grpo | 2.00 | 1.00 | 1.00 | 0.75 | 2.00 |" in table


def test_flags_set_the_workload():
    args = bench.parse_args(["--prompt-len", "20", "--dtype", "bf16", "--no-trl", "--stages", "sft"])
    assert (args.prompt_len, args.dtype, args.no_trl, args.stages) == (20, "bf16", True, "sft")
    default = bench.parse_args([])
    assert default.stages.split(",") == list(bench.STAGES) and "dpo" in bench.TRL_STAGES
    assert bench.parse_args(["--dpo-beta", "0.3"]).dpo_beta == 0.3


INPUTS = {"model": "MODEL", "sft": "SFT", "prefs": "PREFS", "prompts": "PROMPTS"}


def test_our_command_carries_the_settings_table():
    w = bench.Workload(dpo_beta=0.25)
    for stage in bench.STAGES:
        argv = bench.our_command(stage, w, INPUTS, Path("RUN"))
        for s in bench.settings(stage, w):
            assert s.ours_key is None or f"{s.ours_key}={bench.hydra_value(s.ours)}" in argv
    dpo = bench.our_command("dpo", w, INPUTS, Path("RUN"))
    assert {"data.path=PREFS", "algo.beta=0.25", "algo.loss_type=sigmoid", "algo.precompute_reference=false",
            "model.gradient_checkpointing=false", "trainer.micro_batch_size=32"} <= set(dpo)


def test_trl_fields_of_the_settings_table_exist_in_trls_configs():
    trl = pytest.importorskip("trl")
    import dataclasses

    configs = {"sft": trl.SFTConfig, "train-rm": trl.RewardConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}
    for stage, config in configs.items():
        names = {f.name for f in dataclasses.fields(config)}
        assert {s.trl_field for s in bench.settings(stage, bench.Workload()) if s.trl_field} <= names, stage


def test_a_setting_that_differs_is_warned_and_recorded():
    w = bench.Workload()
    report = bench.settings_report(bench.STAGES, w, [], with_trl=True)
    # by default only our padding-free rows differ; ppo has no TRL run to differ from
    assert [line.split(":")[0] for line in report["setting_warnings"]] == ["sft", "train-rm", "dpo", "grpo"]
    assert all("padding-free" in line for line in report["setting_warnings"])
    dpo = {s["name"]: s for s in report["settings"]["dpo"]}
    assert dpo["beta"] == {"name": "beta", "ours_key": "algo.beta", "ours": 0.1, "trl_field": "beta", "trl": 0.1,
                           "differs": False}
    assert json.loads(json.dumps(report)) == report  # bench.json takes it as it is

    overrides = ["algo.lm_coef=0.5", "algo.zero_variance=resample", "algo.precompute_reference=true",
                 "trainer.padding_free=false", "trainer.shared_prefix=false"]
    warned = bench.settings_report(bench.STAGES, w, overrides, with_trl=True)["setting_warnings"]
    assert warned == [  # padding_free=false makes sft and train-rm match TRL; shared_prefix is not in the table
        "train-rm: reward model's language-modelling term differs: ours algo.lm_coef=0.5, TRL 0.0 (no such setting)",
        "dpo: reference log-probs precomputed (else a frozen reference runs every step) differs: ours "
        "algo.precompute_reference=true, TRL precompute_ref_log_probs=false",
        "grpo: dynamic sampling (resampling zero-variance groups) differs: ours algo.zero_variance=resample, "
        "TRL keep (no such setting)"]
    # the command carries the overridden value, and an override equal to TRL's in another spelling is no difference
    assert "algo.lm_coef=0.5" in bench.our_command("train-rm", w, INPUTS, Path("RUN"), ["algo.lm_coef=0.5"])
    assert bench.settings_report(["train-rm"], w, ["algo.lm_coef=0"], with_trl=True)["setting_warnings"] == [
        line for line in report["setting_warnings"] if line.startswith("train-rm")]
    assert bench.settings_report(bench.STAGES, w, overrides, with_trl=False)["setting_warnings"] == []


def test_rounds_take_the_median_of_paired_ratios_and_the_median_run():
    def run(impl, n, samples_per_s, step_s):
        return {"stage": "grpo", "impl": impl, "round": n, "samples_per_s": samples_per_s, "step_s": step_s,
                "peak_rss_mb": 600.0, "mfu": 0.02, "gen_tokens_per_s": None, "train_tokens_per_s": None,
                "phase_s": {"generate": 0.0, "logprob": 0.0, "reward": 0.0, "train": step_s, "other": 0.0}}

    # the machine slows down in round 2: both implementations slow with it, their ratio stays near 1.2
    results = [run("ours", 0, 12.0, 1.0), run("trl", 0, 10.0, 1.2), run("ours", 1, 6.0, 2.0), run("trl", 1, 5.5, 2.2),
               run("ours", 2, 11.0, 1.1), run("trl", 2, 9.0, 1.3), {"stage": "grpo", "impl": "trl", "round": 3,
                                                                     "error": "exit code 1"}]
    ratio = bench.ratios(results)["grpo"]
    assert ratio["samples_per_s"] == pytest.approx(12.0 / 10.0)  # the median of 1.2, 1.09 and 1.22
    assert ratio["peak_rss_mb"] == 1.0 and "gen_tokens_per_s" not in ratio
    chosen = {r["impl"]: r for r in bench.median_runs(results)}
    assert chosen["ours"]["round"] == 2 and chosen["trl"]["round"] == 2  # 1.1 s of 1.0, 1.1, 2.0
    assert chosen["ours"]["rounds_samples_per_s"] == [12.0, 6.0, 11.0]


def test_median_wall_s_times_a_command_and_checks_its_exit_code():
    seconds = bench.median_wall_s([sys.executable, "-c", "import sys; sys.exit(2)"], runs=3, expect_exit=2)
    assert 0 < seconds < 30
    with pytest.raises(SystemExit, match="exited 0, expected 2"):
        bench.median_wall_s([sys.executable, "-c", "pass"], runs=1, expect_exit=2)


def test_config_latency_times_the_config_error_and_torch(monkeypatch):
    timed = []
    monkeypatch.setattr(bench, "median_wall_s", lambda argv, runs, expect_exit=0: timed.append(
        (argv[1:], runs, expect_exit)) or 1.0)
    assert bench.config_latency(runs=4) == {"config_error_s": 1.0, "import_torch_s": 1.0}
    assert timed == [(["-m", "rlhf.cli", "grpo", "algo.loss_type=nope"], 4, 2), (["-c", "import torch"], 4, 0)]
    assert bench.parse_args(["--config-latency"]).config_latency
