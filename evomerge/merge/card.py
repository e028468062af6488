"""The model card (README.md) written into every merged model folder."""

from __future__ import annotations

from typing import Optional


def model_card(recipe_yaml: str, *, base_model: Optional[str], models: list[str], title: str = "Merged model") -> str:
    """A README model card: front matter for the Hub, the sources and the recipe.

    Example:
        >>> print(model_card("merge_method: linear\\n", base_model=None, models=["a", "b"]).splitlines()[8])
        # Merged model
    """
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- evomerge", "- mergekit"]
    if base_model:
        lines += ["base_model:"] + [f"- {m}" for m in [base_model] + [m for m in models if m != base_model]]
    lines += ["---", "", f"# {title}", ""]
    lines += [
        "This model was merged with evomerge from the mergekit-compatible recipe below; "
        "`evomerge merge merge_recipe.yaml --out DIR` (or `mergekit-yaml`) rebuilds it.",
        "",
        "## Sources",
        "",
    ]
    for m in models:
        lines.append(f"- {m}" + (" (base)" if m == base_model else ""))
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
