"""The JVP pass of ResNet-8 (batch 64, one thread, CPU time) with another version of
``metacorrect/meta.py`` beside the installed one, interleaved in one process — how the
BatchNorm rule of docs/PERFORMANCE.md section 3 was measured against the first session's:

    git show ece4140:src/metacorrect/meta.py > /tmp/meta_old.py
    python benchmarks/jvp_ab.py /tmp/meta_old.py
"""
import importlib.util, statistics, sys, time
import torch
import torch.autograd.forward_ad as fwAD
torch.set_num_threads(1)
from metacorrect import meta, perf
from metacorrect.models import create_model
perf.tune_allocator()
spec = importlib.util.spec_from_file_location("metacorrect._meta_old", sys.argv[1])
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)
torch.manual_seed(0)
model = create_model("resnet8", (3, 32, 32), 10).train()
x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
plist = [p for p in model.parameters()]
names = [n for n, _ in model.named_parameters()]
gc = [torch.randn_like(p) for p in plist]
def jvp(mod):
    eng = mod.MetaGradient(model, 0.1, mode="fast", jvp="forward")
    slots = eng._param_slots(names, plist)
    cache = eng._primal_cache()
    with cache.record():
        out = model(x)
    cache.prune()
    t = time.process_time()
    with torch.no_grad(), fwAD.dual_level(), mod.frozen_batchnorm_stats(model):
        duals = [fwAD.make_dual(p.detach(), g) for p, g in zip(plist, gc)]
        with mod.swapped_parameters(slots, duals), cache.tangents_only():
            u = fwAD.unpack_dual(model(x)).tangent
    return u, time.process_time() - t
ua, _ = jvp(old); ub, _ = jvp(meta)
print("relative difference of the tangents:", float((ua - ub).norm() / ua.norm()))
ts = {"old": [], "new": []}
for i in range(30):
    for k, mod in (("old", old), ("new", meta)) if i % 2 else (("new", meta), ("old", old)):
        ts[k].append(jvp(mod)[1])
for k, v in ts.items():
    print(f"JVP pass of ResNet-8 (batch 64, 1 thread, CPU ms, median of 30), {k} meta.py: {statistics.median(v)*1e3:.1f}")
