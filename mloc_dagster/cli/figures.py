"""How the CLI prints a metric: one rule for every table and summary line."""


def figure(value) -> str:
    """A metric: 3 decimals, or "-" when there is none (a job that measured nothing yet, or a
    non-finite figure, which the state store keeps as null: core/state/engine.py: strict_json)."""
    return f"{value:.3f}" if isinstance(value, int | float) else "-"
