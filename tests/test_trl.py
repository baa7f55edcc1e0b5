"""TRL interop, for real: a tiny random Llama trained for a few steps by TRL's DPOTrainer on CPU (full weights, and
a PEFT LoRA adapter), then read back by rmdyn (`--ref`, `--adapter`): rmdyn's IM-RM rewards reproduce the metrics
TRL logs on the evaluation set (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies), and rmdyn's
encoding of the pairs is TRL's token for token. The same through `rmdyn evaluate` on the directories TRL's
`save_model` writes, with β and the loss type read from their training_args.bin (not passed on the command line)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _tiny_hf import tiny_hf_dir
from conftest import require

torch = require("torch")
transformers = require("transformers")
trl = require("trl")
datasets = require("datasets")
peft = require("peft")

ROWS = [
    ("Is the sky blue?", "Yes, it is.", "No."),
    ("Is 2+2=4?", "Yes.", "No, it is 5."),
    ("Do cats bark?", "No, they meow.", "Yes, loudly."),
    ("Is ice cold?", "Yes, very.", "No, it is hot."),
] * 2
BETA = 0.5


def _dataset():
    def conv(p, c, r):
        return {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]}  # fmt: skip

    return datasets.Dataset.from_list([conv(*r) for r in ROWS])


def _train(base, out, peft_config=None):
    """Three DPO steps with TRL; returns (trainer, its evaluation metrics).

    bf16=False: on a CPU with bfloat16 support, transformers' default (bf16=True) runs TRL's forward passes, its
    logged evaluation included, under bfloat16 autocast; measured here, its rewards/chosen then differed from the
    float32 value of the same saved weights by 0.016 (0.8 %)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=len(ROWS),
                         max_steps=3, learning_rate=1e-2, beta=BETA, report_to="none", save_strategy="no",
                         logging_steps=1, use_cpu=True, seed=0, bf16=False)  # fmt: skip
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(),
                             processing_class=tok, peft_config=peft_config)  # fmt: skip
    trainer.train()
    return trainer, trainer.evaluate()


def _rmdyn_metrics(loaded):
    from dynamics.datasets import PreferenceRow
    from experiments.studies import one_step

    rows = [PreferenceRow(p, c, r, i, "trl", i + 1) for i, (p, c, r) in enumerate(ROWS)]
    train = one_step.encode_triples(loaded, rows)
    rm, params = one_step.reward_model("im", loaded, beta=BETA)
    rc, rr = np.asarray(rm.reward(params, train.chosen)), np.asarray(rm.reward(params, train.rejected))
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
               "rewards/accuracies": (rc > rr).mean()}  # fmt: skip
    return metrics, train


def _check(trainer, theirs, loaded):
    ours, train = _rmdyn_metrics(loaded)
    # the same tokens: TRL's prompt + completion ids against rmdyn's encoding and response mask, every row
    for i in range(len(ROWS)):
        row = trainer.eval_dataset[i]
        for side, batch in (("chosen", train.chosen), ("rejected", train.rejected)):
            real = np.asarray(batch.attention_mask)[i] == 1
            assert np.asarray(batch.tokens)[i][real].tolist() == row["prompt_ids"] + row[f"{side}_ids"], (i, side)
            assert int(np.asarray(batch.response_mask)[i][real].sum()) == len(row[f"{side}_ids"]), (i, side)
    for k, v in ours.items():
        assert v == pytest.approx(theirs[f"eval_{k}"], abs=1e-4), k
    assert abs(theirs["eval_rewards/margins"]) > 0.1  # the run moved the rewards


def _evaluate_cli(tmp_path, capsys, *flags):
    """`rmdyn evaluate` on ROWS with `flags` and no --beta: (its evaluation.json, its stdout)."""
    from experiments.cli.main import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in ROWS))
    out = tmp_path / "evaluate"
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), *flags, "--out", str(out)]) == 0
    return json.loads((out / "evaluation.json").read_text()), capsys.readouterr().out


def _check_cli(result, stdout, theirs, settings_dir):
    assert f"from {settings_dir / 'training_args.bin'} (DPOConfig): β = {BETA:g}, objective dpo" in stdout
    assert result["options"]["beta"] == BETA and result["options"]["objective"] == "dpo"
    metrics = result["results"]["IM-RM"]["metrics"]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[k] == pytest.approx(theirs[f"eval_{k}"], abs=1e-4), k
    assert metrics["logps/chosen"] == pytest.approx(theirs["eval_logps/chosen"], rel=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(theirs["eval_logps/rejected"], rel=1e-4)


def _save(trainer, base, directory):
    """TRL's own save (weights or adapter, tokenizer, training_args.bin), with the base's tokenizer files."""
    trainer.save_model(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, directory / name)


def test_a_trl_dpo_run_is_read_back_with_its_reference(tmp_path, capsys):
    from dynamics.loading import load

    base = tiny_hf_dir(tmp_path / "base")
    trainer, theirs = _train(base, tmp_path / "trl")
    policy = tmp_path / "policy"
    _save(trainer, base, policy)
    _check(trainer, theirs, load(str(policy)).with_reference(str(base)))
    result, stdout = _evaluate_cli(tmp_path, capsys, "--model", str(policy), "--ref", str(base))
    _check_cli(result, stdout, theirs, policy)


def test_a_trl_dpo_run_with_a_lora_adapter(tmp_path, capsys):
    from dynamics.loading import load

    base = tiny_hf_dir(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer, theirs = _train(base, tmp_path / "trl", peft_config=config)
    adapter = tmp_path / "adapter"
    _save(trainer, base, adapter)
    loaded = load(str(base)).with_adapter(str(adapter))  # reference: the base, the adapter switched off
    _check(trainer, theirs, loaded)
    result, stdout = _evaluate_cli(tmp_path, capsys, "--model", str(base), "--adapter", str(adapter))
    _check_cli(result, stdout, theirs, adapter)


def test_a_trl_reward_model_is_read_back_with_its_score_head(tmp_path, capsys):
    """TRL's RewardTrainer (a sequence-classification model, 3 steps): rmdyn's EX-RM rewards are the checkpoint's
    own scores, and TRL's pairwise accuracy on the training pairs is rmdyn's."""
    from dynamics.datasets import PreferenceRow
    from dynamics.loading import load
    from experiments.studies import one_step

    base = tiny_hf_dir(tmp_path / "base")
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3,
                            learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                            bf16=False)  # fmt: skip
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]} for p, c, r in ROWS])  # fmt: skip
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    out = tmp_path / "reward_model"
    trainer.model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    loaded = load(str(out))
    assert loaded.score_head is not None
    rows = [PreferenceRow(p, c, r, i, "trl", i + 1) for i, (p, c, r) in enumerate(ROWS)]
    train = one_step.encode_triples(loaded, rows)
    rm, params = one_step.reward_model("ex", loaded)
    ours = np.asarray(rm.reward(params, train.chosen))
    scorer = trainer.model.eval()
    for i in range(len(ROWS)):  # each unpadded row: the checkpoint's own score
        real = np.asarray(train.chosen.attention_mask)[i] == 1
        ids = torch.as_tensor(np.asarray(train.chosen.tokens)[i][real][None], dtype=torch.long)
        with torch.no_grad():
            assert ours[i] == pytest.approx(float(scorer(input_ids=ids).logits[0, 0]), rel=1e-4, abs=1e-5)
    # `rmdyn evaluate --reward ex`: the same scores, and the pairwise accuracy of those scores
    result, _ = _evaluate_cli(tmp_path, capsys, "--model", str(out), "--reward", "ex")
    ex = result["results"]["EX-RM"]
    np.testing.assert_allclose(ex["chosen"], ours, rtol=1e-5, atol=1e-6)
    rejected = np.asarray(rm.reward(params, train.rejected))
    assert ex["metrics"]["rewards/accuracies"] == pytest.approx(float(np.mean(ours > rejected)))
    assert ex["logps_chosen"] is None and "logps/chosen" not in ex["metrics"]
