"""Reproduces a bitsandbytes behaviour that distorts 4-bit training on CPU (found while benchmarking (c) of
reference_model.py): on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight, permanently,
the first time the layer runs in eval mode on an input without grad, and from then on uses an inference kernel
(``gemv_4bit``) that has no backward. A later training step silently gets no gradient through the frozen base
weights - and runs faster. TRL's ``precompute_ref_log_probs`` pass does exactly that first eval forward.

Three LoRA gradients of the same small NF4 Mistral on the same batch: (1) never packed, (2) after one eval
no-grad forward with bitsandbytes' default (packing allowed: packed), (3) the same with packing forbidden, as the
course does (helpers.models.keep_nf4_trainable). Not a timing: prints the gradient differences and writes
results/cpu_nf4_packing_check.json.

    .venv/bin/python -m benchmarks.cpu_nf4_packing_check
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model

from benchmarks import _common as C
from benchmarks.gpu import build_nf4_mistral, mistral_7b_config
from helpers.models import keep_nf4_trainable

NAME = "cpu_nf4_packing_check"


def main() -> int:
    """Measure the three gradients, print them and write the results file."""
    C.prepare_worker_process()
    tokenizer = C.bench_tokenizer()
    config = mistral_7b_config(tokenizer, test_mode=True)
    base = build_nf4_mistral(config, device="cpu", dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ids = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(3))
    caught: set[str] = set()

    def lora_grads(eval_forward_first: bool, forbid_packing: bool) -> dict:
        model = copy.deepcopy(base)
        if forbid_packing:
            keep_nf4_trainable(model)
        else:  # bitsandbytes' own default, set explicitly: the packing this script shows (see C.allow_cpu_nf4_packing)
            C.allow_cpu_nf4_packing(model)
        if eval_forward_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids[:, :8])
        packed = C.packed_nf4_layers(model)
        torch.manual_seed(0)
        model = get_peft_model(model, lora)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, 0.0, 0.02)  # non-zero B, so that A's gradients are non-zero too
        model.train()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        caught.update(str(w.message)[:110] for w in seen if "autograd kernel" in str(w.message))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return {"loss": loss.item(), "packed_layers": packed, "grads": grads}

    clean = lora_grads(False, False)
    packed = lora_grads(True, False)
    guarded = lora_grads(True, True)
    layer0 = next(n for n in clean["grads"] if "layers.0.self_attn.q_proj.lora_A" in n)

    def worst(other: dict) -> float:
        return max(((other["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                   for n, g in clean["grads"].items())

    rows = [
        {"case": "never packed (reference)", "packed_layers": clean["packed_layers"], "loss": clean["loss"],
         "worst_rel_grad_diff": 0.0, "layer0_q_lora_A_grad_norm": clean["grads"][layer0].norm().item()},
        {"case": "eval no-grad forward first (packed)", "packed_layers": packed["packed_layers"],
         "loss": packed["loss"], "worst_rel_grad_diff": worst(packed),
         "layer0_q_lora_A_grad_norm": packed["grads"][layer0].norm().item()},
        {"case": "same, packing forbidden", "packed_layers": guarded["packed_layers"], "loss": guarded["loss"],
         "worst_rel_grad_diff": worst(guarded), "layer0_q_lora_A_grad_norm": guarded["grads"][layer0].norm().item()},
    ]
    print(C.format_table(rows, [("case", "case"), ("packed_layers", "packed NF4 layers"), ("loss", "loss"),
                                ("worst_rel_grad_diff", "worst relative LoRA-grad difference"),
                                ("layer0_q_lora_A_grad_norm", "layer-0 q_proj lora_A grad norm")]))
    verdict = ("bitsandbytes packed the layers and the gradients changed: the backward pass through packed NF4 "
               "layers is wrong" if packed["packed_layers"] and worst(packed) > 1e-3 else
               "no packing on this machine (or no gradient change): nothing to see here")
    print("\n" + verdict + (f"; PyTorch warned: {sorted(caught)}" if caught else ""))
    C.write_result(NAME, {"benchmark": NAME, "command": f"python -m benchmarks.{NAME}", "machine": C.machine_info(),
                          "rows": rows, "verdict": verdict, "torch_warnings": sorted(caught)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
