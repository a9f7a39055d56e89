"""Give back the training placement group of a trial that Tune stopped.

Each trial fits a ``TorchTrainer``; its Train controller (an actor owned by the trial's actor) reserves a
placement group for its workers. When Tune stops a trial (ASHA, or the trial's last epoch at ``max_t``)
it kills the trial's actor, the controller dies with it, and the placement group is left behind: Ray
scopes a non-detached placement group to the *job*, not to the actor that made it. Ray 2.60 has a
detached ``PlacementGroupCleaner`` for this, but it watches the controller through the State API, which
needs the dashboard and, on a machine running several Ray instances, an explicit address; without them it
never cleans up, and every stopped trial keeps its workers' CPUs reserved until the search's driver exits.

So the search keeps its own ledger: a callback in each trial's Train controller records the placement
group it started (``RecordPlacementGroup``), and a Tune callback in the search's driver tells the ledger
when a trial has ended (``ReleaseStoppedTrials``); the ledger then removes that trial's groups that are
still alive, including one recorded after the trial ended (a controller that restarted its workers just
before it died).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group


@ray.remote(num_cpus=0)
class PlacementGroupLedger:
    """Which training placement groups each trial started; removes those of ended trials."""

    def __init__(self) -> None:
        self._groups: dict[str, set[str]] = defaultdict(set)
        self._ended: set[str] = set()
        self.removed: list[str] = []

    def record(self, trial_id: str, placement_group_hex: str) -> None:
        self._groups[trial_id].add(placement_group_hex)
        if trial_id in self._ended:
            self._remove(trial_id)

    def trial_ended(self, trial_id: str) -> int:
        """Remove the trial's placement groups that are still alive; returns how many were."""
        self._ended.add(trial_id)
        return self._remove(trial_id)

    def removed_groups(self) -> list[str]:
        return list(self.removed)

    def _remove(self, trial_id: str) -> int:
        count = 0
        for placement_group_hex in sorted(self._groups.pop(trial_id, set())):
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(placement_group_hex)))
            if ray.util.placement_group_table(group).get("state") == "REMOVED":
                continue  # the controller shut its workers down itself
            try:
                remove_placement_group(group)
            except Exception:  # removed meanwhile by its controller: nothing left to give back
                continue
            self.removed.append(placement_group_hex)
            count += 1
        return count


class RecordPlacementGroup(WorkerGroupCallback):
    """Runs in a trial's Train controller: tells the ledger about each worker group's placement group.

    A Train V2 controller callback (``ray.train.RunConfig(callbacks=...)`` hands callbacks that are not
    ``UserCallback`` to the controller's own hooks, as Ray's ``PlacementGroupCleanerCallback`` is)."""

    def __init__(self, ledger: Any, trial_id: str) -> None:
        self._ledger = ledger
        self._trial_id = trial_id

    def after_worker_group_start(self, worker_group: Any) -> None:
        state = worker_group.get_worker_group_state()
        placement_group = state.placement_group_handle.placement_group
        ray.get(self._ledger.record.remote(self._trial_id, placement_group.id.hex()))


class ReleaseStoppedTrials(Callback):
    """Tune callback in the search's driver: when a trial ends, its leftover placement groups go.

    Holds the ledger's name, not its handle: Tune pickles its callbacks into the experiment's state, and a
    resumed search (a new driver) starts a new ledger under the same name."""

    def __init__(self, ledger_name: str) -> None:
        self._ledger_name = ledger_name

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ray.get_actor(self._ledger_name).trial_ended.remote(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ray.get_actor(self._ledger_name).trial_ended.remote(trial.trial_id)


def start_ledger(name: str, attempts: int = 30) -> Any:
    """The search's ledger actor (named, so that trials and callbacks find it); lives with the driver.

    A resumed search may start while the ledger of the killed driver before it is still being torn down
    under the same name: wait for that one to go rather than hand out a dying actor."""
    from ray.exceptions import GetTimeoutError, RayActorError

    for _ in range(attempts):
        ledger = PlacementGroupLedger.options(name=name, get_if_exists=True).remote()
        try:
            ray.get(ledger.removed_groups.remote(), timeout=60)
            return ledger
        except (RayActorError, GetTimeoutError):
            time.sleep(1.0)
    raise RuntimeError(f"could not start the placement-group ledger actor {name!r}")
