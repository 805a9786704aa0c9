"""The report's tables as plain rows of text: key numbers, the run's recipe, eval details.

Each builder returns `[(label, value, detail), ...]` with every value already formatted, leaving
out rows whose data is absent, so the HTML layer only escapes and lays out.
"""

from __future__ import annotations

from alignkit.report.inputs import RunInputs, num
from alignkit.report.plots import acc_triple, checkpoints

NA = "n/a"


def fmt_num(x) -> str:
    """Numbers at a precision a reader can use: 0.6931, 12.35, 1,234, 5e-06."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    v = num(x)
    if v is None:
        return NA
    a = abs(v)
    if v == int(v) and a < 1e15:
        return f"{int(v):,}"
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1e-3:
        return f"{v:.4g}"
    return f"{v:.2g}"


def fmt_pct(x) -> str:
    v = num(x)
    return NA if v is None else f"{100 * v:.1f}%"


def fmt_acc(a) -> str:
    """An accuracy dict as '63.5% (95% CI 57.1-69.4%, n=200)'."""
    t = acc_triple(a)
    if t is None:
        return NA
    v, lo, hi = t
    parts = [f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%"] if lo is not None and hi is not None else []
    n = num(a.get("n"))
    if n is not None:
        parts.append(f"n={fmt_num(int(n))}")
    return fmt_pct(v) + (f" ({', '.join(parts)})" if parts else "")


def fmt_value_ci(a) -> str:
    """A non-accuracy statistic with an interval, e.g. KL '3.21 (95% CI 2.9-3.52, n=200)'."""
    if not isinstance(a, dict) or num(a.get("value")) is None:
        return NA
    ci, parts = a.get("ci95"), []
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in (num(ci[0]), num(ci[1])):
        parts.append(f"95% CI {fmt_num(ci[0])} to {fmt_num(ci[1])}")
    if num(a.get("n")) is not None:
        parts.append(f"n={fmt_num(int(a['n']))}")
    return fmt_num(a["value"]) + (f" ({', '.join(parts)})" if parts else "")


def last_value(rows: list, *keys: str) -> tuple:
    """(value, step, key) of the last finite value of the first key logged, else (None, None, None)."""
    for key in keys:
        for r in reversed(rows):
            if num(r.get(key)) is not None:
                return num(r[key]), r["step"], key
    return None, None, None


def _section(d: dict, name: str) -> dict:
    v = d.get(name)
    return v if isinstance(v, dict) else {}


def key_numbers(inp: RunInputs) -> list:
    rows = []
    steps = inp.summary.get("steps")
    if num(steps) is None and inp.train_rows:
        steps = inp.train_rows[-1]["step"]
    if num(steps) is not None:
        rows.append(("steps", fmt_num(steps), ""))
    for split, rows_, key in (("train", inp.train_rows, "loss"), ("eval", inp.eval_rows, "loss")):
        v, step, _ = last_value(rows_, key)
        if v is None:
            v, step = num(_section(inp.summary, split).get(key)), None
        if v is not None:
            rows.append(
                (f"final {split} loss", fmt_num(v), f"step {fmt_num(step)}" if step is not None else "summary.json")
            )
    v, step, key = last_value(inp.eval_rows, "rewards/accuracies", "accuracy")
    if v is None:
        ev = _section(inp.summary, "eval")
        key = next((k for k in ("rewards/accuracies", "accuracy") if num(ev.get(k)) is not None), None)
        v = num(ev.get(key)) if key else None
    if v is not None:
        rows.append(
            ("final eval accuracy", fmt_pct(v), f"{key}" + (f", step {fmt_num(step)}" if step is not None else ""))
        )
    tps = [num(r.get("tokens_per_s")) for r in inp.train_rows]
    tps = sorted(v for v in tps if v is not None)
    if tps:
        rows.append(("throughput", f"{fmt_num(tps[len(tps) // 2])} tokens/s", f"median of {len(tps)} logged steps"))
    rows += _eval_key_numbers(inp.eval)
    rows += _before_after_key_numbers(inp.before_after)
    return rows


def _fixed(x, sign: bool = False) -> str:
    v = num(x)
    return NA if v is None else (f"{v:+.3f}" if sign else f"{v:.3f}")


def _ci_text(ci) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in (num(ci[0]), num(ci[1])):
        return f"[{_fixed(ci[0], True)}, {_fixed(ci[1], True)}]"
    return NA


def _before_after_key_numbers(ba: dict) -> list:
    overall = [r for r in ba.get("rows") or [] if r.get("overall")]
    if not overall:
        return []
    r = overall[0]
    detail = f"change {_fixed(r.get('diff'), True)}, 95% CI {_ci_text(r.get('ci95'))}"
    if num(r.get("n")) is not None:
        detail += f", n={fmt_num(int(r['n']))}"
    return [(ba.get("title") or "before → after", f"{_fixed(r['before'])} → {_fixed(r['after'])}", detail)]


def before_after_table(ba: dict) -> tuple[list, list]:
    """(header, rows) of a before/after section: each row's before, after, change, its 95% CI and n."""
    rows = [
        [
            str(r["label"]),
            _fixed(r["before"]),
            _fixed(r["after"]),
            _fixed(r["diff"] if "diff" in r else num(r["after"]) - num(r["before"]), True),
            _ci_text(r.get("ci95")),
            fmt_num(r["n"]) if num(r.get("n")) is not None else NA,
        ]
        for r in ba.get("rows") or []
    ]
    return ["", "before", "after", "change", "95% CI of change", "n"], rows


def side_check_table(ba: dict) -> tuple[list, list]:
    """(header, rows) of the section's side checks (before and after only)."""
    rows = [
        [
            str(r["label"]),
            _fixed(r["before"]),
            _fixed(r["after"]),
            fmt_num(r["n"]) if num(r.get("n")) is not None else NA,
        ]
        for r in ba.get("side_checks") or []
    ]
    return ["side check", "before", "after", "n"], rows


def _eval_key_numbers(ev: dict) -> list:
    rows = []
    pref, gen, lb = _section(ev, "preference"), _section(ev, "generation"), _section(ev, "length_bias")
    if acc_triple(pref.get("ranking_accuracy")) is not None:
        ideal = pref.get("idealized_ranking_accuracy")
        detail = ""
        if isinstance(ideal, dict) and num(ideal.get("value")) is not None:
            beta = f", β = {fmt_num(ideal['beta'])}" if num(ideal.get("beta")) is not None else ""
            detail = f"idealized: {fmt_pct(ideal['value'])}{beta} (arXiv 2405.19534)"
        rows.append(("ranking accuracy", fmt_acc(pref["ranking_accuracy"]), detail))
    for key, label in (
        ("implicit_reward_accuracy", "implicit reward accuracy"),
        ("reward_accuracy", "reward model accuracy"),
    ):
        if acc_triple(pref.get(key)) is not None:
            rows.append((label, fmt_acc(pref[key]), ""))
    wr = gen.get("win_rate")
    if acc_triple(wr) is not None:
        wtl = [num(wr.get(k)) for k in ("wins", "ties", "losses")]
        detail = (
            f"{fmt_num(int(wtl[0]))} wins, {fmt_num(int(wtl[1]))} ties, {fmt_num(int(wtl[2]))} losses"
            if None not in wtl
            else ""
        )
        if gen.get("scorer"):
            detail += ("; " if detail else "") + f"scored by {gen['scorer']}"
        rows.append(("win rate vs reference", fmt_acc(wr), detail))
    lc = gen.get("length_controlled_win_rate")
    if acc_triple(lc) is not None:
        lengths = [num(gen.get(k)) for k in ("policy_length_mean", "reference_length_mean")]
        detail = "at equal length (AlpacaEval LC, arXiv 2404.04475)"
        if None not in lengths:
            detail += f"; mean tokens {fmt_num(lengths[0])} against {fmt_num(lengths[1])}"
        rows.append(("length-controlled win rate", fmt_acc(lc), detail))
    if isinstance(gen.get("kl"), dict) and num(gen["kl"].get("value")) is not None:
        rows.append(("KL(policy || reference)", fmt_value_ci(gen["kl"]), "on generated completions"))
    corrs = [
        (k, label)
        for k, label in (
            ("corr_margin_length_diff", "r(margin, length difference)"),
            ("corr_reward_length", "r(reward, length)"),
        )
        if k in lb
    ]
    if corrs:
        value = "; ".join(f"{label} = {fmt_corr(lb[k])}" for k, label in corrs)
        rows.append(("length-bias correlation", value, f"{lb.get('reward') or 'implicit'} reward"))
    return rows


def fmt_corr(x) -> str:
    v = num(x)
    return NA if v is None else f"{v:+.2f}"


def run_table(cfg: dict) -> list:
    """The recipe, model, loss and key hyper-parameters from config.yaml."""
    if not cfg:
        return []
    model, train, data, lora = (_section(cfg, k) for k in ("model", "train", "data", "lora"))
    rows = [("recipe", str(cfg.get("recipe", NA)), ""), ("model", str(model.get("name_or_path", NA)), "")]
    rows.append(("loss", _loss_text(cfg), ""))
    if "reference" in cfg:
        rows.append(
            ("reference", str(cfg["reference"]), "log-probs cached once" if cfg["reference"] == "cached" else "")
        )
    if lora:
        rows.append(("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}" if lora.get("enabled") else "off", ""))
    if "learning_rate" in train:
        sched = ", ".join(
            f"{k.replace('_', ' ')} {fmt_num(train[k]) if k != 'lr_schedule' else train[k]}"
            for k in ("lr_schedule", "warmup_ratio")
            if k in train
        )
        rows.append(("learning rate", fmt_num(train["learning_rate"]), sched))
    if "batch_size" in train:
        bs, ga = num(train.get("batch_size")), num(train.get("grad_accum", 1))
        detail = f"{fmt_num(bs)} × {fmt_num(ga)} accumulation" if ga not in (None, 1) else ""
        rows.append(("batch size", fmt_num(bs * ga if None not in (bs, ga) else bs), detail))
    length = [f"{k} {fmt_num(train[k])}" for k in ("max_steps", "epochs") if num(train.get(k)) is not None]
    if length:
        rows.append(("length", "; ".join(length), ""))
    for key, label in (("precision", "precision"), ("max_grad_norm", "max grad norm")):
        if key in train:
            rows.append((label, fmt_num(train[key]) if num(train[key]) is not None else str(train[key]), ""))
    if data.get("train"):
        rows.append(("data", str(data["train"]), f"eval: {data['eval']}" if data.get("eval") else ""))
    if "seed" in cfg:
        rows.append(("seed", fmt_num(cfg["seed"]), ""))
    return rows


def _loss_text(cfg: dict) -> str:
    def one(spec: dict, weighted: bool) -> str:
        params = ", ".join(
            f"{k}={fmt_num(v) if num(v) is not None else v}" for k, v in spec.items() if k not in ("name", "weight")
        )
        w = f"{fmt_num(spec.get('weight', 1.0))} × " if weighted else ""
        return f"{w}{spec.get('name', '?')}" + (f" ({params})" if params else "")

    terms = [t for t in cfg.get("losses") or [] if isinstance(t, dict)]
    if terms:
        return " + ".join(one(t, True) for t in terms)
    loss = cfg.get("loss")
    return one(loss, False) if isinstance(loss, dict) else NA


def eval_tables(ev: dict) -> dict:
    """{title: rows} for the eval's provenance, preference metrics and generation metrics."""
    out = {}
    meta = [(k, str(ev[k]), "") for k in ("model", "reference", "data", "date") if ev.get(k) is not None]
    if num(ev.get("n_pairs")) is not None:
        meta.append(("pairs", fmt_num(ev["n_pairs"]), ""))
    pref = _section(ev, "preference")
    rows = []
    for key, label in (
        ("ranking_accuracy", "ranking accuracy (sum log-prob)"),
        ("ranking_accuracy_mean_logprob", "ranking accuracy (mean log-prob)"),
        ("implicit_reward_accuracy", "implicit reward accuracy"),
        ("reward_accuracy", "reward model accuracy"),
    ):
        if acc_triple(pref.get(key)) is not None:
            rows.append((label, fmt_acc(pref[key]), ""))
    ideal = pref.get("idealized_ranking_accuracy")
    if isinstance(ideal, dict) and num(ideal.get("value")) is not None:
        rows.append(
            (
                "idealized ranking accuracy",
                fmt_pct(ideal["value"]),
                f"β = {fmt_num(ideal.get('beta'))}, n={fmt_num(ideal.get('n'))}; what a perfect DPO/RLHF "
                "optimum would reach (arXiv 2405.19534)",
            )
        )
    if isinstance(pref.get("implicit_margin"), dict):
        rows.append(("implicit reward margin", fmt_value_ci(pref["implicit_margin"]), ""))
    if rows:
        out["Preference"] = rows
    gen = _section(ev, "generation")
    rows = [
        (label, f(gen[k]), "")
        for k, label, f in (
            ("n_prompts", "prompts", fmt_num),
            ("scorer", "scorer", str),
            ("win_rate", "win rate", fmt_acc),
            ("kl", "KL(policy || reference)", fmt_value_ci),
            ("policy_reward_mean", "policy mean reward", fmt_num),
            ("reference_reward_mean", "reference mean reward", fmt_num),
        )
        if gen.get(k) is not None
    ]
    if rows:
        out["Generation"] = rows
    st = _section(ev, "strategy")
    if st.get("strategy"):
        kl, cost = st.get("kl") or {}, st.get("cost") or {}
        rows = [("strategy", str(st["strategy"]), ""), ("prompts", fmt_num(st.get("n_prompts")), "")]
        if isinstance(st.get("reward"), dict):
            rows.append(("reward", fmt_value_ci(st["reward"]), ""))
        if isinstance(st.get("sampling_reward"), dict):
            rows.append(("reward of plain sampling", fmt_value_ci(st["sampling_reward"]), ""))
        if acc_triple(st.get("win_rate_vs_sampling")) is not None:
            rows.append(("win rate vs sampling", fmt_acc(st["win_rate_vs_sampling"]), ""))
        if num(kl.get("value")) is not None:
            rows.append(("KL from sampling", f"{fmt_num(kl['value'])} nats", str(kl.get("kind") or "")))
        if num(cost.get("seconds")) is not None:
            ratio = num(cost.get("seconds_vs_sampling"))
            rows.append(("time", f"{fmt_num(cost['seconds'])} s", f"{ratio:.1f}x sampling" if ratio else ""))
        if num(cost.get("new_tokens")) is not None:
            ratio = num(cost.get("new_tokens_vs_sampling"))
            rows.append(("new tokens", fmt_num(cost["new_tokens"]), f"{ratio:.1f}x sampling" if ratio else ""))
        out["Inference-time strategy"] = rows
    if meta:  # provenance last: the numbers are what a reader came for
        out["Evaluated"] = meta
    return out


CHECKPOINT_COLUMNS = (
    ("step", "step"),
    ("kl", "KL"),
    ("reward", "reward"),
    ("win_rate", "win rate"),
    ("topk_entropy", "top-k entropy"),
    ("topk_mass", "top-k mass"),
    ("chosen_logp_change", "chosen Δlog-prob"),
    ("chosen_logp_down_fraction", "chosen down"),
)


def checkpoint_table(inp: RunInputs) -> tuple[list, list]:
    """(header, rows) of per-checkpoint numbers, with only the columns some checkpoint has."""
    cks = checkpoints(inp)
    cols = [(k, label) for k, label in CHECKPOINT_COLUMNS if any(c.get(k) is not None for c in cks)]

    def cell(c, k):
        if k == "win_rate":
            return fmt_pct(c[k].get("value")) if isinstance(c.get(k), dict) else NA
        if k == "chosen_logp_down_fraction":
            return fmt_pct(c.get(k))
        return fmt_num(c.get(k))

    return [label for _, label in cols], [[cell(c, k) for k, _ in cols] for c in cks]
