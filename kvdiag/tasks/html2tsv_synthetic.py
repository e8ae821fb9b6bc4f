"""A seeded HTML→TSV listing page with gold TSV, for controlled length sweeps and machines without data.

A shop page lists `n_items` product cards (name, price, rating, stock) among page boilerplate (nav
links, promo paragraphs, script and tracking snippets) whose amount sizes the prompt to
`target_tokens`. The task: extract name, price and rating of every product, optionally only those in
stock (`only_in_stock`, LongProc-style filtering instruction). Scored with LongProc's row-level F1
(`html2tsv.tsv_metrics`). The prompt keeps LongProc's sections and placeholders but is kvdiag's own
wording, the same with or without the data directory, so sweeps agree across machines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvdiag.errors import KvdiagError
from kvdiag.tasks.base import Sample, Task, check_n, counter_name, fit_length, token_counter
from kvdiag.tasks.html2tsv import tsv_metrics
from kvdiag.tasks.prose import NeutralProse

PROMPT = """[TASK]
Read the HTML webpage below and extract information from it into a TSV file, following the instruction given after the page.

[INPUT WEBPAGE]
```html
{html_str}
```

[TARGET INFORMATION]
From the HTML webpage above about {task_topic}, extract these properties of the items listed on the page: {task_description}{filtering_instruction}

[OUTPUT FORMAT]
Write one TSV row per item, with the properties separated by a tab "\\t", in this format:
```tsv
{tsv_header}
(your rows)
```

[IMPORTANT NOTES]
- Read every item on the page and keep the order in which the items appear.
- If only rows meeting a condition are asked for, output only those rows.
- If a property is blank or not applicable, write "N/A".
- Keep values exactly as written on the page, including units and currency symbols; no HTML tags.
- Output nothing but the TSV.

Now extract the information from the webpage above in the format above."""

TOPIC = "products of an online home and outdoor store"
DESCRIPTION = "(1) Name of the product; (2) Current price of the product; (3) Average customer rating"
HEADER = "name\tprice\trating"
FILTER = '\nOnly extract the rows where the stock status is "In stock".'

_ADJ = "Compact Classic Foldable Wireless Insulated Ergonomic Portable Deluxe Bamboo Ceramic Stainless Solar Cordless Waterproof Adjustable Vintage".split()
_NOUN = "Kettle|Lantern|Desk Lamp|Backpack|Water Bottle|Garden Hose|Toaster|Camp Chair|Blender|Umbrella|Cutting Board|Tent|Fan|Speaker|Thermos|Doormat".split(
    "|"
)
_COLORS = ["Black", "White", "Sage", "Navy", "Sand", "Red", "Slate", "Teal"]


def _card(sku: int, name: str, price: str, rating: str, in_stock: bool) -> str:
    stock = "In stock" if in_stock else "Out of stock"
    return (
        f'<div class="product-card" data-sku="SKU-{sku}">\n'
        f'  <h3 class="product-title"><a href="/p/{sku}">{name}</a></h3>\n'
        f'  <div class="price"><span class="amount">{price}</span></div>\n'
        f'  <div class="rating">Rated <span class="stars">{rating}</span> out of 5</div>\n'
        f'  <span class="stock">{stock}</span>\n'
        f"</div>"
    )


class _Boilerplate:
    """An endless seeded stream of page chrome: nav links, promo paragraphs, scripts, tracking tags."""

    def __init__(self, seed: int):
        self._rng = random.Random(f"boilerplate-{seed}")
        self._prose = NeutralProse(seed)
        self._blocks: list[str] = []
        self._n_prose = 0

    def take(self, k: int) -> list[str]:
        r = self._rng
        while len(self._blocks) < k:
            kind = r.random()
            if kind < 0.45:
                self._n_prose += 1
                sentence = self._prose.take(self._n_prose)[-1]
                self._blocks.append(f'<p class="promo-note">{sentence}</p>')
            elif kind < 0.7:
                slug = r.choice(
                    ["help", "returns", "gift-cards", "stores", "careers", "press", "blog", "contact"]
                )
                self._blocks.append(
                    f'<li class="nav-item"><a href="/{slug}?ref={r.randrange(10**6)}">{slug}</a></li>'
                )
            elif kind < 0.85:
                self._blocks.append(
                    f'<script>window.dataLayer=window.dataLayer||[];dataLayer.push({{"event":"view","slot":{r.randrange(999)}}});</script>'
                )
            else:
                self._blocks.append(
                    f'<div class="spacer" style="height:{r.randrange(4, 40)}px" aria-hidden="true"></div>'
                )
        return self._blocks[:k]


@dataclass
class HtmlToTsvSynthetic(Task):
    """Knobs: n_items (product cards, default 6), only_in_stock (filtering instruction, default False)."""

    name = "html2tsv_synthetic"
    title = "HTML→TSV (synthetic)"
    description = "Seeded HTML listing page → TSV with gold, sized to target_tokens (LongProc row-level F1)"
    metric = "f1"

    n_items: int = 6
    only_in_stock: bool = False

    def __post_init__(self):
        if not isinstance(self.n_items, int) or self.n_items < 1:
            raise KvdiagError(f"n_items must be a positive integer, got {self.n_items!r}")

    def data_available(self) -> bool:
        return True

    def samples(self, n: int, seed: int = 0, tokenizer: Any | None = None, target_tokens: int = 4096):
        check_n(n)
        count = token_counter(tokenizer)
        out = []
        for i in range(n):
            rng = random.Random(f"html2tsv-synth-{seed}-{i}")
            names = rng.sample([f"{a} {b} ({c})" for a in _ADJ for b in _NOUN for c in _COLORS], self.n_items)
            items = []
            for j, name in enumerate(names):
                price = f"${rng.randint(4, 499)}.{rng.choice(['00', '49', '95', '99'])}"
                rating = f"{rng.randint(20, 50) / 10:.1f}"
                in_stock = rng.random() < 0.6 or (self.only_in_stock and j == 0)
                items.append((10000 + rng.randrange(90000), name, price, rating, in_stock))
            fractions = sorted(rng.random() for _ in items)
            chrome = _Boilerplate(rng.randrange(1 << 30))

            def build(k, items=items, fractions=fractions, chrome=chrome):
                return PROMPT.format(
                    html_str=_page(chrome.take(k), items, fractions),
                    task_topic=TOPIC,
                    task_description=DESCRIPTION,
                    filtering_instruction=FILTER if self.only_in_stock else "",
                    tsv_header=HEADER,
                )

            k, prompt, tokens = fit_length(build, count, target_tokens, self.name)
            kept = [it for it in items if it[4] or not self.only_in_stock]
            gold = "\n".join([HEADER] + [f"{name}\t{price}\t{rating}" for _, name, price, rating, _ in kept])
            meta = {
                "n_facts": len(kept),
                "n_items": len(items),
                "target_tokens": target_tokens,
                "tokens": tokens,
                "token_counter": counter_name(tokenizer),
                "boilerplate_blocks": k,
            }
            out.append(Sample(f"{self.name}-s{seed}-{i}", [{"role": "user", "content": prompt}], gold, meta))
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        return tsv_metrics(prediction, sample.gold)["f1"]

    def metrics(self, prediction: str, sample: Sample) -> dict[str, float]:
        return tsv_metrics(prediction, sample.gold)


def _page(chrome: list[str], items: list[tuple], fractions: list[float]) -> str:
    body: list[str] = []
    j = 0
    for pos in range(len(chrome) + 1):
        while j < len(items) and round(fractions[j] * len(chrome)) == pos:
            body.append(_card(*items[j]))
            j += 1
        if pos < len(chrome):
            body.append(chrome[pos])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>Home &amp; Outdoor Store</title></head>\n'
        '<body>\n<main id="listing">\n' + "\n".join(body) + "\n</main>\n</body>\n</html>"
    )

    def answer_text(self, sample: Sample) -> str:
        """The gold TSV in a ```tsv block, as the prompt asks."""
        return f"```tsv\n{sample.gold.strip()}\n```"
