"""In-process federated simulation: rounds of site selection, local training, screening, aggregation, evaluation.

Site selection and non-private batch sampling come from seeded generators; a DP site's noise and
sampling come from the OS CSPRNG (reproducible only with DPConfig(reproducible_noise=True), which
makes the run not private). After every round the history is written and an atomic checkpoint
holds the global model and every site's optimizer, accountant, RNG and noise-stream state, so a
stopped run resumes with its privacy spent intact (and, with reproducible noise, to the same
result as an uninterrupted one). Checkpoints are read with weights_only=True and validated.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from fastdp.accounting import PrivacyBudgetExceeded
from fastdp.federated.history import History
from fastdp.federated.records import RoundRecord, TrainResult
from fastdp.federated.site import SiteUpdate, evaluate_model, stable_seed
from fastdp.federated.site_protocol import FederatedSite
from fastdp.federated.state_files import StateFileError, check_finite, check_model_state, load_state, save_state
from fastdp.federated.strategies import Strategy
from fastdp.federated.validation import screen_updates
from fastdp.models import dice_ce_criterion

log = logging.getLogger("fastdp.federated")

CHECKPOINT_NAME = "checkpoint.pt"


class FederationError(RuntimeError):
    """A federated run that produced no model: no site contributed an update in any round."""


def privacy_summary(sites: dict[str, FederatedSite], strategy: Strategy) -> dict:
    """The History's "privacy" record: whose noise is private, what each site releases (docs/privacy.md)."""
    site_noise, reasons = {}, []
    for sid, s in sites.items():
        private = s.noise_is_private
        site_noise[sid] = None if private is None else ("os-csprng" if private else "reproducible")
        if private is False:
            reasons.append(f"site {sid}: dp.reproducible_noise is set (its noise can be regenerated from the config)")
    server_noise = None
    if strategy.epsilon() is not None:
        server_noise = "reproducible" if getattr(strategy, "reproducible_noise", False) else "os-csprng"
        if server_noise == "reproducible":
            reasons.append("server: DP-FedAvg noise is seeded (reproducible)")
    any_dp = any(v is not None for v in site_noise.values()) or server_noise is not None
    if not any_dp:
        reasons.append("no DP: no site trains with DP-SGD and the strategy adds no noise")
    return {
        "private": not reasons,
        "not_private_reasons": reasons,
        "site_noise": site_noise,
        "server_noise": server_noise,
        "releases": {sid: s.releases() for sid, s in sites.items()},
    }


def initial_global_state(model_fn: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """The starting global model's state_dict, initialised from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed("init", seed))
        model = model_fn()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def public_error(error: BaseException, dp: bool) -> str:
    """How a site's failure is reported to the server: a DP site names only the error's type, because
    its message may describe the private data (e.g. which samples gave a NaN loss)."""
    if dp:
        return f"{type(error).__name__} (details in the site's own log)"
    return f"{type(error).__name__}: {error}"


def update_note(update) -> str:
    """Progress-line suffix "  loss L  epsilon E" (no loss from a DP site, no epsilon from a non-DP one)."""
    loss = "" if update.train_loss is None else f"  loss {update.train_loss:.4f}"
    eps = "" if update.epsilon is None else f"  epsilon {update.epsilon:.3f}"
    return loss + eps


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _NullWriter:
    """Where a progress bar draws when it is not drawn live (its state is printed as lines instead)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class Simulation:
    """Runs federated training of `sites` under `strategy` in this process.

    Args:
        sites: the participating Sites (unique site_id each).
        strategy: FedAvg, FedProx, DPFedAvg or any Strategy.
        model_fn: builds the architecture; the initial global model is model_fn() seeded by `seed`.
        initial_state: start from this state_dict instead.
        test_data: held-out Dataset evaluated every eval_every rounds (Dice over all pixels).
        test_parts: the same test data split by origin, {name: Dataset} (e.g. each site's own
            held-out patients); each part's Dice and loss go to the round's ``test["by_site"]``,
            so a report can show whether a model (DP or not) serves one site worse than another.
        rounds: total rounds (a resumed run continues up to this number).
        seed: seeds the initial model and the site selection.
        checkpoint_dir: where checkpoint.pt and the sites' own state files go (None: no checkpoints).
        out_dir: where history.json / history.csv are written after every round (None: not written).
        progress: a tqdm bar of the rounds (elapsed, rate, time left) and one line per round and
            per site, on stderr; off a terminal (CI logs) the bar's state is one more line a round.
            False prints nothing.
        eval_every: evaluate every this many rounds (and always after the last).
        max_update_norm, outlier_factor: update screening (see validation.screen_updates).
        config: free-form description stored in the history.
        mode: label stored in the history ("nonprivate", "dp-sgd", "dp-fedavg", ...).
    """

    def __init__(
        self,
        sites: list[FederatedSite],
        strategy: Strategy,
        model_fn: Callable[[], nn.Module] | None = None,
        *,
        initial_state: dict[str, torch.Tensor] | None = None,
        test_data: Dataset | None = None,
        test_parts: Mapping[str, Dataset] | None = None,
        rounds: int = 5,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        out_dir: str | Path | None = None,
        progress: bool = True,
        eval_every: int = 1,
        max_update_norm: float | None = None,
        outlier_factor: float | None = 100.0,
        config: dict | None = None,
        mode: str | None = None,
        criterion: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        ids = [s.site_id for s in sites]
        if not sites:
            raise ValueError("Simulation needs at least one site")
        if len(set(ids)) != len(ids):
            raise ValueError(f"site ids must be unique, got {ids}")
        if rounds < 1 or eval_every < 1:
            raise ValueError("rounds and eval_every must be >= 1")
        if model_fn is None:
            raise ValueError("Simulation needs model_fn (the architecture; evaluation builds the model from it)")
        self.sites = {s.site_id: s for s in sites}
        self.strategy = strategy
        self.model_fn = model_fn
        self.global_state = dict(initial_state) if initial_state is not None else initial_global_state(model_fn, seed)
        self.test_data = test_data
        self.test_parts = dict(test_parts) if test_parts else {}
        if self.test_parts and test_data is None:
            raise ValueError("test_parts split the test data: pass test_data (all of it) as well")
        self.rounds, self.seed, self.eval_every = int(rounds), int(seed), int(eval_every)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress = progress
        self.max_update_norm, self.outlier_factor = max_update_norm, outlier_factor
        self.criterion = criterion if criterion is not None else dice_ce_criterion()
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(stable_seed("selection", seed))
        self.stopped_budget: list[str] = []
        if mode is None:
            mode = "dp-fedavg" if strategy.epsilon() is not None else ("dp-sgd" if self._any_dp() else "nonprivate")
        self.history = History(config=dict(config or {}), mode=mode, privacy=privacy_summary(self.sites, strategy))
        for reason in self.history.privacy["not_private_reasons"]:
            if "reproducible" in reason:
                log.warning("this run is NOT private: %s", reason)
                self._say(f"WARNING: this run is NOT private: {reason}")
        self.history.config.setdefault("strategy", strategy.describe())
        self.history.config.setdefault("sites", {s.site_id: repr(s) for s in sites})
        self._test_model = None
        if self.checkpoint_dir is not None:
            for s in sites:
                s.persist_state_to(self.checkpoint_dir / "sites" / f"{s.site_id}.pt")

    def _any_dp(self) -> bool:
        return any(s.is_private for s in self.sites.values())

    # --- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    def save_checkpoint(self, round: int) -> None:
        """Atomic checkpoint of everything needed to continue after `round` (tensors and plain values only)."""
        if self.checkpoint_path is None:
            return
        state = {
            "round": round,
            "site_ids": list(self.sites),
            "global_state": self.global_state,
            "strategy": self.strategy.state_dict(),
            "sites": {sid: s.state_dict() for sid, s in self.sites.items()},
            "selection_rng": self.generator.get_state(),
            "stopped_budget": list(self.stopped_budget),
            "history": self.history.to_dict(),
        }
        save_state(state, self.checkpoint_path)

    def load_checkpoint(self) -> int:
        """Restores the state saved after a round; returns that round (0 if there is no checkpoint).

        Raises StateFileError naming the file when it is unreadable, altered, or does not fit this run.
        """
        path = self.checkpoint_path
        if path is None or not path.exists():
            return 0
        what = "checkpoint"
        state = load_state(path, what)
        keys = ("round", "site_ids", "global_state", "strategy", "sites", "selection_rng", "stopped_budget", "history")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise StateFileError(f"{what} {path} lacks entries {[k for k in keys if k not in (state or {})]}")
        if state["site_ids"] != list(self.sites):
            raise StateFileError(f"{what} {path} is for sites {state['site_ids']}, this run has {list(self.sites)}")
        global_state = check_model_state(state["global_state"], self.global_state, path, what)
        check_finite(state["strategy"], path, what, "strategy")
        try:
            self.strategy.load_state_dict(state["strategy"])
            for sid, s in self.sites.items():
                s.load_state_dict(state["sites"][sid])
            self.generator.set_state(state["selection_rng"])
            history = History.from_dict(state["history"])
            round_ = int(state["round"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise StateFileError(f"{what} {path}: {type(exc).__name__}: {exc}") from None
        self.global_state = global_state
        self.stopped_budget = [str(x) for x in state["stopped_budget"]]
        self.history = history
        self.history.privacy = privacy_summary(self.sites, self.strategy)
        return round_

    # --- one round -----------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.progress:
            # tqdm.write moves a running bar below the line instead of printing through it.
            tqdm.write(msg, file=sys.stderr)

    def _select_sites(self, round: int, record: RoundRecord) -> list[str]:
        """Drops the sites whose next round would pass their budget, then lets the strategy choose."""
        available = []
        for sid, s in self.sites.items():
            if sid in self.stopped_budget:
                continue
            if not s.within_budget():
                self.stopped_budget.append(sid)
                log.warning("site %s stops: the next round would pass its epsilon budget %s", sid, s.epsilon_budget)
                self._say(f"  site {sid} stops taking part: epsilon budget {s.epsilon_budget} reached")
                continue
            available.append(sid)
        record.stopped_budget = list(self.stopped_budget)
        return self.strategy.select(available, round, self.generator)

    def train_sites(self, site_ids: list[str], round: int, config: dict) -> dict[str, TrainResult]:
        """Asks each site to train from the global state; {site_id: TrainResult}, in site_ids order.

        In process: one site after the other. FlowerSimulation sends them all at once instead;
        everything else of a round (selection, book-keeping, screening, aggregation) is this class's.
        """
        results = {}
        for sid in site_ids:
            site, t0 = self.sites[sid], time.perf_counter()
            try:
                update = site.local_update(self.global_state, round, config)
            except PrivacyBudgetExceeded as e:
                results[sid] = TrainResult(error=f"PrivacyBudgetExceeded: {e}", budget_stop=True)
                continue
            except Exception as e:  # a failing site must not stop the round
                log.error("site %s failed in round %d:\n%s", sid, round, traceback.format_exc())
                results[sid] = TrainResult(error=public_error(e, dp=site.is_private))
                continue
            results[sid] = TrainResult(update=update, seconds=time.perf_counter() - t0)
        return results

    def evaluate_sites(self, site_ids: list[str]) -> dict[str, dict[str, float]]:
        """{site_id: {"dice", "loss"}} of the global model on each site's validation data ({} without)."""
        return {sid: self.sites[sid].evaluate(self.global_state) for sid in site_ids}

    def _local_phase(self, round: int, record: RoundRecord) -> list[SiteUpdate]:
        selected = self._select_sites(round, record)
        results = self.train_sites(selected, round, self.strategy.site_config(round))
        updates = []
        for sid in selected:
            result = results[sid]
            if result.budget_stop:
                self.stopped_budget.append(sid)
                record.failed.append({"site": sid, "error": result.error})
                log.warning("site %s refused a step beyond its budget: %s", sid, result.error)
                continue
            if result.update is None:
                record.failed.append({"site": sid, "error": result.error})
                log.error("site %s failed in round %d: %s", sid, round, result.error)
                self._say(f"  site {sid} FAILED: {result.error}")
                continue
            update = result.update
            site_record = record.sites[sid]
            site_record.participated, site_record.train_loss = True, update.train_loss
            site_record.steps, site_record.local_s = update.steps, result.seconds
            updates.append(update)
            self._say(f"  site {sid}: {update.steps} steps in {result.seconds:.1f} s{update_note(update)}")
        return updates

    def _evaluate(self, record: RoundRecord) -> None:
        metrics = self.evaluate_sites(list(self.sites))
        for sid, site_record in record.sites.items():
            site_record.val_dice = metrics.get(sid, {}).get("dice")
            site_record.val_loss = metrics.get(sid, {}).get("loss")
        self._evaluate_test(record)

    def _evaluate_test(self, record: RoundRecord) -> None:
        """Dice and loss of the global model on the held-out test set, at the server."""
        if self.test_data is None:
            return
        if self._test_model is None:
            self._test_model = self.model_fn().to(self.device)
        model, data = self._test_model, self.test_data
        record.test = evaluate_model(model, self.global_state, data, self.criterion, self.device)
        if self.test_parts:
            record.test["by_site"] = {
                name: evaluate_model(model, self.global_state, part, self.criterion, self.device)
                for name, part in self.test_parts.items()
            }

    def run_round(self, round: int) -> RoundRecord:
        """One round; returns its record (also appended to self.history)."""
        t_round = time.perf_counter()
        record = RoundRecord.start(round, {sid: s.num_samples for sid, s in self.sites.items()})
        t0 = time.perf_counter()
        updates = self._local_phase(round, record)
        t_local = time.perf_counter() - t0

        t0 = time.perf_counter()
        accepted, rejected = screen_updates(
            updates,
            self.global_state,
            self.max_update_norm,
            self.outlier_factor,
            site_sizes={sid: s.num_samples for sid, s in self.sites.items()},
            norm_screening=self.strategy.norm_screening,
        )
        for r in rejected:
            log.warning("round %d: update of site %s rejected: %s", round, r["site"], r["reason"])
            self._say(f"  update of site {r['site']} REJECTED: {r['reason']}")
            if r["site"] in record.sites:
                record.sites[r["site"]].participated = False
        record.rejected = rejected
        record.participants = [u.site_id for u in accepted]
        new_state = self.strategy.aggregate(self.global_state, accepted, round)
        bad = [k for k, v in new_state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:  # finite updates can still sum past the dtype's range: keep the last good model
            log.error("round %d: the aggregate is not finite in %s; the global model is kept", round, bad[:3])
            self._say(f"  round {round}: aggregate NOT finite in {bad[:3]}; global model kept")
            record.rejected += [{"site": u.site_id, "reason": "the aggregate was not finite"} for u in accepted]
            record.participants = []
        else:
            self.global_state = new_state
        t_agg = time.perf_counter() - t0

        for sid, s in self.sites.items():
            record.sites[sid].epsilon = s.epsilon() if s.is_private else None
        record.server_epsilon = self.strategy.epsilon()

        t0 = time.perf_counter()
        if round % self.eval_every == 0 or round == self.rounds:
            self._evaluate(record)
        t_eval = time.perf_counter() - t0
        record.phase_s = {"local_training": t_local, "aggregation": t_agg, "evaluation": t_eval}
        record.wall_s = time.perf_counter() - t_round
        self.history.rounds.append(record)
        return record

    # --- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = True, stop_after: int | None = None) -> History:
        """Runs rounds up to self.rounds (continuing from the checkpoint when resume is set).

        Args:
            resume: continue from checkpoint_dir/checkpoint.pt when it exists.
            stop_after: stop after this round (to split a run; a later run() with resume continues).
        Returns: the History (also written to out_dir after every round).
        """
        start = self.load_checkpoint() + 1 if resume else 1
        if start > 1:
            self._say(f"resuming after round {start - 1} from {self.checkpoint_path}")
        last = self.rounds if stop_after is None else min(self.rounds, stop_after)
        # tqdm keeps the time left; smoothing=0: from the mean round time of this run (rounds differ
        # little), mininterval=0: redrawn after every round (rounds take seconds, not microseconds).
        # Off a terminal (CI logs, a Flower ServerApp's log file) a redrawn bar would be a run of
        # carriage returns: the bar then draws nowhere and its state is written as one line a round.
        live = _is_terminal(sys.stderr)
        bar = tqdm(
            total=self.rounds,
            initial=start - 1,
            desc=f"[{self.history.mode}]",
            unit="round",
            file=sys.stderr if live else _NullWriter(),
            disable=not self.progress,
            dynamic_ncols=live,
            ascii=None if live else True,
            smoothing=0,
            mininterval=0,
        )
        with bar:
            for r in range(start, last + 1):
                self._say(f"[{self.history.mode}] round {r}/{self.rounds}")
                rec = self.run_round(r)
                if self.out_dir is not None:
                    self.history.save(self.out_dir)
                self.save_checkpoint(r)
                self._say(self._summary_line(rec, r))
                bar.update(1)
                if self.progress and not live:
                    self._say(str(bar))
        if self.out_dir is not None:
            self.history.save(self.out_dir)
        if last == self.rounds and self.history.rounds and not any(r.participants for r in self.history.rounds):
            raise FederationError(self._nothing_trained_message())
        return self.history

    def _nothing_trained_message(self) -> str:
        """Why no round aggregated an update: each site's failures, rejections and budget stops."""
        why: dict[str, str] = {}
        for r in self.history.rounds:
            for f in r.failed:
                why.setdefault(f["site"], f"failed: {f['error']}")
            for f in r.rejected:
                why.setdefault(f["site"], f"rejected: {f['reason']}")
            for sid in r.stopped_budget:
                why.setdefault(sid, "its epsilon budget is smaller than one round's spend")
        detail = "; ".join(f"{sid}: {w}" for sid, w in why.items()) or "no site was selected"
        return (
            f"no site contributed an update in any of the {len(self.history.rounds)} rounds, so the global model is "
            f"the initial one. {detail}"
        )

    def _summary_line(self, rec: RoundRecord, r: int) -> str:
        """After round r: "[mode] round r/R done in T s | test Dice D | epsilon site=e ... | server epsilon E"."""
        parts = [f"[{self.history.mode}] round {r}/{self.rounds} done in {rec.wall_s:.1f} s"]
        if rec.test:
            parts.append(f"test Dice {rec.test['dice']:.3f}")
        eps = {sid: s.epsilon for sid, s in rec.sites.items() if s.epsilon is not None}
        if eps:
            parts.append("epsilon " + " ".join(f"{k}={v:.2f}" for k, v in eps.items()))
        if rec.server_epsilon is not None:
            parts.append(f"server epsilon {rec.server_epsilon:.2f}")
        return " | ".join(parts)

    @property
    def global_model(self) -> nn.Module:
        """A fresh model holding the current global state."""
        model = self.model_fn()
        model.load_state_dict(self.global_state)
        return model
