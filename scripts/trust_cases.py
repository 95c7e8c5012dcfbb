"""Issue 9 cases: run on any version of captum-relp (e.g. PYTHONPATH=<old checkout>) to compare behaviours.

    PYTHONPATH=. python scripts/trust_cases.py
"""
import sys, threading, warnings
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from captum_relp import (LayerRelevancePatching as RelP, LayerAttributionPatching as AtP,
    LayerIntegratedGradientsPatching as IG, LayerActivationPatching as AP, logit_diff, model_components, apply_rules)


class Swish(torch.nn.Module):
    def forward(self, x): return x * torch.sigmoid(x)


def main() -> None:
    """Run every case and print its outcome."""
    warnings.filterwarnings("ignore")
    def tiny():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).eval()

    m = tiny(); parts = model_components(m)
    ids = torch.randint(0, 100, (2, 6)); bad = ids.clone(); bad[:, 2] = (bad[:, 2] + 7) % 100
    def run(name, fn):
        try:
            out = fn()
            print(f"{name}: {out}")
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:110]}")

    def compiled():
        s = RelP(torch.compile(m), parts.mlp).attribute(ids, baselines=bad, target=3)
        return f"sum|scores| = {sum(float(x.abs().sum()) for x in s):.4g} (uncompiled {sum(float(x.abs().sum()) for x in RelP(m, parts.mlp).attribute(ids, baselines=bad, target=3)):.4g})"
    run("1 compiled model", compiled)

    def threads():
        model = tiny(); p = model_components(model); errors = []
        def work():
            for _ in range(15):
                try: AtP(model, p.mlp).attribute(ids, baselines=bad, target=3)
                except Exception as e: errors.append(type(e).__name__)
        ts = [threading.Thread(target=work) for _ in range(3)]
        [t.start() for t in ts]; [t.join() for t in ts]
        return f"{len(errors)} errors, {sum(q.requires_grad for q in model.parameters())}/{len(list(model.parameters()))} params requires_grad after"
    run("2 threads", threads)

    def out_of_order():
        model = tiny(); a = apply_rules(model, "relp"); b = apply_rules(model, "relp")
        a.__enter__(); b.__enter__(); a.__exit__(None, None, None); b.__exit__(None, None, None)
        return f"{sum('forward' in mod.__dict__ for mod in model.modules())} modules left patched"
    run("2 apply_rules out of order", out_of_order)

    def nested():
        inner = AtP(m, parts.mlp[0])
        def metric(o):
            inner.attribute(ids, baselines=bad, target=1); return o[:, -1, 1]
        RelP(m, parts.mlp[1]).attribute(ids, baselines=bad, metric=metric); return "ran"
    run("3 nested attribute", nested)

    ld = logit_diff(1, 2)
    for cls in (RelP, IG, AP):
        def mean_metric(cls=cls):
            kw = {"n_steps": 2} if cls is IG else {}
            s = cls(m, parts.mlp[0]).attribute(ids, baselines=bad, metric=lambda o: ld(o).mean(), **kw)
            ref = cls(m, parts.mlp[0]).attribute(ids, baselines=bad, metric=ld, **kw)
            return f"ratio to correct scores {float(s.sum() / ref.sum()):.3f}"
        run(f"4 metric .mean() {cls.__name__}", mean_metric)
    run("4 NaN metric RelP", lambda: f"all NaN: {bool(torch.isnan(RelP(m, parts.mlp[0]).attribute(ids, baselines=bad, metric=lambda o: o[:, -1, 1] * float('nan'))).all())}")
    run("5 IG target=-1", lambda: f"equals target=99: {torch.equal(IG(m, parts.mlp[0]).attribute(ids, baselines=bad, target=-1, n_steps=2), IG(m, parts.mlp[0]).attribute(ids, baselines=bad, target=99, n_steps=2))}")
    run("5 IG target=150", lambda: IG(m, parts.mlp[0]).attribute(ids, baselines=bad, target=150, n_steps=2).shape)

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), Swish(), torch.nn.Linear(4, 2))
    run("6 custom Swish, strict", lambda: RelP(net, net[0]).attribute(torch.randn(1, 4), baselines=torch.zeros(1, 4), target=0).shape)
    mask = torch.ones_like(ids); mask[0, -2:] = 0
    run("7 bound forward + model=", lambda: RelP(m.forward, parts.mlp, model=m).attribute(ids, baselines=bad, target=3, additional_forward_args=(mask,))[0].shape)
    def pad():
        a = RelP(m, parts.mlp[0]).attribute(ids, baselines=bad, metric=logit_diff(1, 2), additional_forward_args=(mask,))
        b = RelP(m, parts.mlp[0]).attribute(ids, baselines=bad, metric=logit_diff(1, 2, torch.tensor([3, 5])), additional_forward_args=(mask,))
        return f"rel. error of padded row {float((a[0]-b[0]).norm()/b[0].norm()):.3f}"
    run("8 logit_diff right padding", pad)
    def f64():
        from captum_relp.rules import LayerNormRule
        ln = torch.nn.LayerNorm(8).double(); x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
        undo = LayerNormRule().apply(ln); y = ln(x); g = torch.randn_like(y); y.backward(g); undo()
        gw = g * ln.weight.detach(); exp = (gw - gw.mean(-1, keepdim=True)) / torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + ln.eps)
        return f"max error {float((x.grad - exp).abs().max()):.1e}"
    run("9 float64 LN-rule", f64)
    run("10 empty batch", lambda: RelP(m, parts.mlp[0]).attribute(ids[:0], baselines=bad[:0], target=1).shape)
    run("10 AP head num_heads=5", lambda: AP(m, parts.attn[0]).attribute(ids, baselines=bad, target=1, granularity="head", num_heads=5, attribute_to_layer_input=True).shape)
    def inf():
        with torch.inference_mode(): return RelP(m, parts.mlp[0]).attribute(ids, baselines=bad, target=1).shape
    run("10 inference_mode", inf)


if __name__ == "__main__":
    main()
