"""Reading what a view wrote back, with Rerun's own reader (rerun.chunk.RrdReader): per entity
path, its rows as {column: value} (components named `Archetype:field`)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def read_rrd(path: Path) -> dict[str, list[dict]]:
    from rerun.chunk import RrdReader
    rows: dict[str, list[dict]] = defaultdict(list)
    for chunk in RrdReader(path).stream().to_chunks():
        batch = chunk.to_record_batch()
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names
                   if ':' in name}
        for i in range(batch.num_rows):
            rows[chunk.entity_path.lstrip('/')].append({k: v[i] for k, v in columns.items()})
    return dict(rows)


def values(rows: dict, entity: str, column: str) -> list:
    """Every logged value of `column` on `entity`, in log order (empty rows left out)."""
    return [row[column] for row in rows.get(entity, []) if row.get(column) is not None]
