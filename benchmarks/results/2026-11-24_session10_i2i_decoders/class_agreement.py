"""Session 11's one-off I2I check: does the translation g_y(f_x(x)) draw the class that z = f_x(x)
encodes? For each I2I run (shared encoder), on the source train images: h(f_x(x)) against the
label, a target oracle (translation_probe.py's cached LeNet) on g_y(f_x(x)) against the label and
against h's reading of z, and h(f_y(g_y(f_x(x)))) against the label (what L_trc trains).

    PYTHONPATH=. python benchmarks/results/2026-11-24_session10_i2i_decoders/class_agreement.py \
        DATA_ROOT ORACLE.safetensors RUN...

Kept as the record of what ran. Since session 12, ``benchmarks/translation_probe.py`` prints the
same columns for any translating method (``run on x_s``, ``oracle = run``, ``run on G(x_s)``;
checked: the same 81.7 / 11.0 / 12.1 / 34.6 on the λ_tr 0.005 seed-0 run at step 1,200).
"""
import sys

import torch
from safetensors.torch import load_file

from benchmarks.probe_common import Domains, predict
from uda_cli.data.transforms import normalize
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.trainer import load_method
from uda_cli.models.digits import digit_backbone

root, oracle_path, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
f, h = digit_backbone("lenet", 1, 10)
oracle = torch.nn.Sequential(f, h)
oracle.load_state_dict(load_file(oracle_path))
oracle.eval()
dom = Domains()
pct = lambda a, b: 100.0 * (a == b).float().mean().item()  # noqa: E731
print("| run | step | h on source % | label kept % | oracle = h(z) % | h(f_y(translation)) = label % | h on target % |")
print("|---|---|---|---|---|---|---|")
for run in runs:
    m, meta = load_method(ckpt.resolve_checkpoint(run), torch.device("cpu"))
    m.nets.eval()
    xs, ys = dom(meta["src"], "train", root, 1, (32, 32))
    xs, ys = normalize(xs[:5000]), ys[:5000]
    xt, yt = dom(meta["tgt_eval"], "test", root, 1, (32, 32))
    xt = normalize(xt)
    with torch.no_grad():
        tr = torch.cat([m.translate(xs[i : i + 500]).clamp(-1, 1) for i in range(0, len(xs), 500)])
    hz = predict(lambda x: m.nets["h"](m.f_x(x)), xs)
    orc = predict(oracle, tr)
    htr = predict(lambda x: m.nets["h"](m.f_y(x)), tr)
    ht = predict(lambda x: m.nets["h"](m.f_y(x)), xt)
    print(f"| {run} | {meta['step']} | {pct(hz, ys):.1f} | {pct(orc, ys):.1f} | {pct(orc, hz):.1f} | "
          f"{pct(htr, ys):.1f} | {pct(ht, yt):.1f} |", flush=True)
