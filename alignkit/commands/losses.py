"""`alignkit losses`: the registered loss functions."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("losses", help="list the registered loss functions")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit import losses

    rows = [
        (
            s.name,
            "yes" if s.needs_reference else "no",
            s.data,
            ", ".join(f"{k}={v}" for k, v in s.params.items()),
            s.summary,
            s.citation,
        )
        for s in losses.available()
    ]
    if args.markdown:
        from alignkit.config import markdown_cell

        print("| name | reference | data | parameters | what it does | paper |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print("| " + " | ".join((f"`{r[0]}`",) + tuple(markdown_cell(c) for c in r[1:])) + " |")
        return 0
    for name, ref, data, params, summary, cite in rows:
        print(f"{name:<10} reference: {ref:<3}  data: {data:<7} {params}")
        print(f"           {summary}")
        print(f"           {cite}")
    return 0
