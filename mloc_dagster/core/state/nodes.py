"""Nodes and how much their adapters are trusted (reputation in [0, 1]).

A node unknown to the store is a fresh one with full reputation. Operators set a reputation with
`mloc node set-reputation`; merges read it to weight adapters and to decide stable vs.
experimental (SPEC §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mloc_dagster.core.state.engine import StoreEngine
from mloc_dagster.core.state.schema import DEFAULT_NODE_REPUTATION, nodes


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    reputation: float
    updated_at: datetime | None


class NodeStore(StoreEngine):
    def get_node(self, node_id: str) -> NodeRecord:
        """The node's record; an unknown node is a fresh one (full reputation)."""
        with self._read() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).mappings().first()
        return NodeRecord(node_id, DEFAULT_NODE_REPUTATION, None) if row is None else _node(row)

    def node_reputation(self, node_id: str) -> float:
        return self.get_node(node_id).reputation

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as conn:
            return [_node(r) for r in conn.execute(sa.select(nodes).order_by(nodes.c.node_id)).mappings()]

    def set_node_reputation(self, node_id: str, reputation: float) -> float:
        value = min(1.0, max(0.0, float(reputation)))
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            conn.execute(nodes.update().where(nodes.c.node_id == node_id)
                         .values(reputation=value, updated_at=self._clock()))
        return value

    def _ensure_node(self, conn: Connection, node_id: str) -> None:
        conn.execute(self._insert(nodes).values(node_id=node_id, reputation=DEFAULT_NODE_REPUTATION, jobs_today=0,
                                                jobs_day=None, updated_at=self._clock())
                     .on_conflict_do_nothing(index_elements=["node_id"]))


def _node(row: Any) -> NodeRecord:
    return NodeRecord(row["node_id"], float(row["reputation"]), row["updated_at"])
