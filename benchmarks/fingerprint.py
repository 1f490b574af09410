"""Fingerprints of everything compression computes on the embedded default, to show that a refactor
changed nothing: calibration statistics (8 x 256 C4-train tokens), the factors, spectra and loss
tails of every factorisation method, and the rank plan of every allocation rule on weight and data
spectra at 20% parameter reduction. Run it on two checkouts and compare the JSON files:

    PYTHONPATH=/path/to/old/src python benchmarks/fingerprint.py old.json
    python benchmarks/fingerprint.py new.json && cmp old.json new.json
"""
import hashlib
import json
import sys

import torch

import welore

try:
    from welore.factorize import analyze_data_aware, attach_loss_tails
except ImportError:  # checkouts before the factorize/ package
    from welore.calibrate import analyze_data_aware, attach_loss_tails
from welore.calibrate import calibration_batches, collect_stats

print(welore.__file__, file=sys.stderr)
def h(*ts):
    m = hashlib.sha256()
    for t in ts:
        m.update(t.detach().contiguous().cpu().numpy().tobytes())
    return m.hexdigest()[:16]
if len(sys.argv) != 2:
    sys.exit(__doc__)
loaded = welore.load_model(None)
model, tok = loaded.model, loaded.tokenizer
targets = welore.find_targets(model)
stats = collect_stats(model, targets, calibration_batches(tok, 8, 256), gradients=True, progress=False)
out = {"stats": h(*[stats[t.name].gram for t in targets], *[stats[t.name].grad_sq for t in targets])}
weight = welore.analyze(model, targets, keep_factors=True, progress=False)
for method in ["svd", "asvd", "whiten", "whiten-fisher"]:
    sp = analyze_data_aware(model, targets, stats, method, progress=False)
    out[method] = {"factors": h(*[f for t in targets for f in sp.factors[t.name]]),
                   "values": h(*[sp.values[t.name] for t in targets])}
    attach_loss_tails(model, sp, stats, method)
    out[method]["tails"] = h(*[torch.tensor(sp.tails[t.name]) for t in targets])
    for alloc in ["welore", "uniform", "loss"]:
        for spec_name, spec in (("weight", weight), ("data", sp)):
            if alloc == "loss" and spec_name == "weight":
                continue
            p = welore.allocate(spec, ratio=0.2, target="params", allocation=alloc,
                                min_ratio=0.0 if alloc == "loss" else 0.5)
            out[method][f"{alloc}-{spec_name}"] = hashlib.sha256(json.dumps(p.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
