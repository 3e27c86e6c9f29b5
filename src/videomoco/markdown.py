"""Markdown tables: the one format of every summary, demo report and benchmark record."""


def table(header, rows):
    """The lines of a markdown table. header: column names; rows: lists of cells (printed with `str`,
    `|` escaped so that a cell cannot split the row)."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + " --- |" * len(header)] + [line(row) for row in rows]
