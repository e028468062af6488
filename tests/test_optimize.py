"""Optimizer layer: cma generations over free slots, failures, restarts, resume; Optuna
samplers; scalarization; configuration errors. Synthetic objectives, in-memory studies."""

from __future__ import annotations

import math
import random

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.optimize import (
    OPTIMIZERS,
    CmaOptimizer,
    Objective,
    Scalarization,
    build_optimizer,
)
from evomerge.optimize import _unit_cube, samplers
from evomerge.optimize._state import load_state

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOSS = [Objective("loss", "minimize")]
TWO = [Objective("acc", "maximize"), Objective("size", "minimize")]


def space(d: int = 4) -> dict[str, FloatDistribution]:
    dists = {f"w{i}": FloatDistribution(0.0, 1.0) for i in range(d - 1)}
    dists["density"] = FloatDistribution(1e-3, 1.0, log=True)
    return dists


def sphere(params: dict) -> float:
    """Shifted sphere: 0 at w_i = 0.3 and density = 0.1 (log-scaled)."""
    loss = sum((v - 0.3) ** 2 for k, v in params.items() if k.startswith("w"))
    return loss + (math.log10(params["density"]) + 1.0) ** 2 / 9.0


def make_study(opt) -> optuna.Study:
    return optuna.create_study(directions=opt.directions(), sampler=opt.sampler())


def drive(opt, study, *, slots, generations, rng, outcome=None, checks=None):
    """The driver loop: ask up to the free slots, finish one in-flight trial at random.

    ``outcome(trial) -> (scores, state)``; ``checks`` collects an ordering violation per
    asked cma trial whose earlier generations still have trials in flight.
    """
    outcome = outcome or (lambda t: ([sphere(t.params)], TrialState.COMPLETE))
    in_flight = []
    while opt.generation < generations:
        for t in opt.ask(study, slots - len(in_flight)):
            g = t.user_attrs.get("cma_generation")
            if checks is not None and g is not None:
                older = [u for u in in_flight if u.user_attrs.get("cma_generation", g) < g]
                checks.extend(older)
            in_flight.append(t)
        assert in_flight, "the optimizer asked nothing while nothing was in flight"
        t = in_flight.pop(rng.randrange(len(in_flight)))
        scores, state = outcome(t)
        opt.tell(study, t, scores, state)
    return in_flight


def gen_trials(study, g):
    ts = [t for t in study.trials if t.user_attrs.get("cma_generation") == g]
    return sorted(ts, key=lambda t: t.user_attrs["cma_index"])


def params_matrix(trials):
    return np.array([[t.params[k] for k in sorted(t.params)] for t in trials])


# --------------------------------------------------------------------------- cma


def test_cma_fills_free_slots_with_whole_generations():
    opt = CmaOptimizer(space(), LOSS, seed=3, popsize=6)
    study = make_study(opt)
    checks: list = []
    left = drive(opt, study, slots=4, generations=3, rng=random.Random(0), checks=checks)
    assert not left and not checks
    assert len(study.trials) == 3 * 6
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for g in range(3):
        assert [t.user_attrs["cma_index"] for t in gen_trials(study, g)] == list(range(6))
    # The study holds what pycma proposed, mapped back from the unit cube.
    assert all(1e-3 <= t.params["density"] <= 1.0 for t in study.trials)


def test_cma_waits_while_generation_in_flight():
    opt = CmaOptimizer(space(), LOSS, seed=1, popsize=6)
    study = make_study(opt)
    first = opt.ask(study, 4)
    second = opt.ask(study, 4)
    assert (len(first), len(second)) == (4, 2)
    assert opt.ask(study, 4) == []
    for t in first + second[:1]:
        opt.tell(study, t, [sphere(t.params)])
    assert opt.ask(study, 4) == [] and opt.generation == 0
    opt.tell(study, second[1], [sphere(second[1].params)])
    assert opt.generation == 1 and len(opt.ask(study, 10)) == 6


def test_cma_improves_a_sphere():
    opt = CmaOptimizer(space(4), LOSS, seed=0)
    study = make_study(opt)
    drive(opt, study, slots=3, generations=15, rng=random.Random(1))
    first = [t.value for t in gen_trials(study, 0)]
    last = [t.value for t in gen_trials(study, 14)]
    assert np.median(last) < 0.1 * np.median(first)
    assert study.best_value < 0.01


def test_cma_resume_gives_identical_next_generation():
    a = CmaOptimizer(space(), LOSS, seed=7, popsize=6)
    study_a = make_study(a)
    drive(a, study_a, slots=4, generations=2, rng=random.Random(2))
    snapshot = load_state(study_a)  # what the study holds after generation 2
    assert snapshot["generation"] == 2
    drive(a, study_a, slots=4, generations=3, rng=random.Random(3))

    b = CmaOptimizer(space(), LOSS, seed=7, popsize=6)
    study_b = make_study(b)
    b.load_state(snapshot)
    assert b.generation == 2
    asked = b.ask(study_b, 10)
    assert [t.user_attrs["cma_generation"] for t in asked] == [2] * 6
    got = params_matrix(sorted(asked, key=lambda t: t.user_attrs["cma_index"]))
    assert np.allclose(got, params_matrix(gen_trials(study_a, 2)), rtol=0, atol=1e-12)

    # A different seed would not: the test above is not trivially true.
    c = CmaOptimizer(space(), LOSS, seed=8, popsize=6)
    other = params_matrix(sorted(c.ask(make_study(c), 6), key=lambda t: t.number))
    assert not np.allclose(other, params_matrix(gen_trials(study_a, 0)))


def test_cma_restore_mid_generation_reuses_finished_trials():
    # Uninterrupted reference run.
    ref = CmaOptimizer(space(), LOSS, seed=11, popsize=6)
    study_ref = make_study(ref)
    drive(ref, study_ref, slots=4, generations=4, rng=random.Random(4))

    # Crash during generation 2: one trial COMPLETE, one FAIL (interrupted, say), two
    # RUNNING, two never asked.
    a = CmaOptimizer(space(), LOSS, seed=11, popsize=6)
    study = make_study(a)
    drive(a, study, slots=4, generations=2, rng=random.Random(5))
    running = a.ask(study, 4)
    a.tell(study, running[0], [sphere(running[0].params)])
    a.tell(study, running[1], None, TrialState.FAIL)
    stale = running[2:]
    assert load_state(study)["generation"] == 2  # the state lives in the study

    b = CmaOptimizer(space(), LOSS, seed=11, popsize=6)
    assert b.recover(study) == 2  # the stale RUNNING trials fail, nothing is enqueued
    assert not study.get_trials(states=(TrialState.WAITING,))
    b.restore(study)
    assert b.generation == 2
    n_before = len(study.trials)
    drive(b, study, slots=4, generations=4, rng=random.Random(6))

    # Only the 5 candidates of generation 2 without a finished evaluation were asked again.
    g2 = [t for t in study.trials if t.user_attrs.get("cma_generation") == 2]
    assert len(g2) == 6 + 1 + len(stale)
    assert sorted(t.user_attrs["cma_index"] for t in g2 if t.state == TrialState.COMPLETE) == list(range(6))
    assert len(study.trials) == n_before + 5 + 6
    for g in (2, 3):
        done = [t for t in gen_trials(study, g) if t.state == TrialState.COMPLETE]
        assert np.allclose(params_matrix(done), params_matrix(gen_trials(study_ref, g)), rtol=0, atol=1e-12)


def test_cma_restore_after_tell_before_save_replays_whole_generations(monkeypatch):
    # The study may be ahead of the saved state (crash between a tell and the save):
    # replay finishes the saved generation from the study and goes on.
    a = CmaOptimizer(space(), LOSS, seed=5, popsize=6)
    study = make_study(a)
    drive(a, study, slots=6, generations=1, rng=random.Random(0))
    monkeypatch.setattr(a, "_save", lambda: None)  # every later save is lost
    drive(a, study, slots=6, generations=3, rng=random.Random(1))
    assert load_state(study)["generation"] == 1
    b = CmaOptimizer(space(), LOSS, seed=5, popsize=6)
    b.restore(study)
    assert b.generation == 3
    nxt = b.ask(study, 6)
    assert [t.user_attrs["cma_generation"] for t in nxt] == [3] * 6
    assert np.allclose(
        params_matrix(sorted(nxt, key=lambda t: t.user_attrs["cma_index"])),
        params_matrix(sorted(a.ask(make_study(a), 6), key=lambda t: t.user_attrs["cma_index"])),
    )


def test_cma_restore_adopts_an_enqueued_but_unasked_candidate():
    # Crash between enqueue_trial and study.ask: the WAITING candidate is taken as itself.
    a = CmaOptimizer(space(), LOSS, seed=9, popsize=4)
    study = make_study(a)
    a.ask(study, 2)
    params = a._cube.to_params(a._X[2])
    study.enqueue_trial(params, user_attrs={"cma_generation": 0, "cma_index": 2, "cma_restart": 0})
    b = CmaOptimizer(space(), LOSS, seed=9, popsize=4)
    b.restore(study)
    batch = b.ask(study, 10)
    assert [t.user_attrs["cma_index"] for t in batch] == [2, 0, 1, 3]
    assert batch[0].params == params
    for t in batch:
        b.tell(study, t, [sphere(t.params)])
    assert b.generation == 1


def test_cma_state_rejects_another_space():
    a = CmaOptimizer(space(), LOSS, seed=0)
    study = make_study(a)
    drive(a, study, slots=8, generations=1, rng=random.Random(0))
    b = CmaOptimizer(space(5), LOSS, seed=0)
    with pytest.raises(ConfigError, match="another search space"):
        b.restore(study)


def test_cma_state_in_the_study_keeps_two_states_only():
    """A long search does not pile one pickled ES per generation into its storage."""
    a = CmaOptimizer(space(), LOSS, seed=3, popsize=4)
    study = make_study(a)
    drive(a, study, slots=4, generations=6, rng=random.Random(0))
    attrs = study._storage.get_study_system_attrs(study._study_id)
    kept = {k.rsplit(":", 1)[0] for k, v in attrs.items() if k.startswith("evomerge:optimizer_state:") and v is not None}
    assert len(kept) == 2 and load_state(study)["generation"] == 6


def test_cma_failures_get_the_penalty_and_the_generation_is_told():
    opt = CmaOptimizer(space(), LOSS, seed=2, popsize=6)
    study = make_study(opt)
    trials = sorted(opt.ask(study, 6), key=lambda t: t.user_attrs["cma_index"])
    losses = [sphere(t.params) for t in trials]
    opt.tell(study, trials[0], [losses[0]])
    opt.tell(study, trials[1], None, TrialState.FAIL)
    opt.tell(study, trials[2].number, [0.5], TrialState.PRUNED)  # screening score
    opt.tell(study, trials[3], None, TrialState.PRUNED)
    opt.tell(study, trials[4], [float("nan")])  # non-finite: a failure
    opt.tell(study, trials[5], [losses[5]])
    assert opt.generation == 1
    states = [study.trials[t.number].state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.PRUNED,
                      TrialState.FAIL, TrialState.COMPLETE]
    seen = [-losses[0], -0.5, -losses[5]]
    penalty = min(seen) - 1.0
    assert opt.last_values == pytest.approx([-losses[0], penalty, -0.5, penalty, penalty, -losses[5]])
    assert study.trials[trials[2].number].user_attrs["screen_scores"] == {"loss": 0.5}
    assert len(opt.ask(study, 6)) == 6  # the next generation goes on


def test_cma_declared_penalty_and_all_failed_generation():
    opt = CmaOptimizer(space(), LOSS, seed=2, popsize=6, penalty=-100.0)
    study = make_study(opt)
    for t in opt.ask(study, 6):
        opt.tell(study, t, None, TrialState.FAIL)
    assert opt.last_values == [-100.0] * 6
    opt2 = CmaOptimizer(space(), LOSS, seed=2, popsize=6)
    study2 = make_study(opt2)
    for t in opt2.ask(study2, 6):
        opt2.tell(study2, t, None, TrialState.FAIL)
    assert opt2.last_values == [-1.0] * 6 and len(opt2.ask(study2, 6)) == 6


def test_cma_ipop_restarts_double_the_population_then_finish():
    opt = CmaOptimizer(space(), LOSS, seed=4, popsize=4, restarts=1, maxiter=2)
    study = make_study(opt)
    sizes = []
    while not opt.finished:
        batch = opt.ask(study, 100)
        sizes.append(len(batch))
        for t in batch:
            opt.tell(study, t, [sphere(t.params)])
    assert sizes == [4, 4, 8, 8]
    assert opt.restart == 1 and len(opt.stop_reasons) == 2 and "maxiter" in opt.stop_reasons[0]
    assert {t.user_attrs["cma_restart"] for t in gen_trials(study, 2)} == {1}
    assert opt.ask(study, 4) == []
    study.enqueue_trial({"w0": 0.3})
    assert len(opt.ask(study, 4)) == 1  # a finished optimizer still hands out WAITING trials


def test_cma_x0_log_mapping_and_pycma_options():
    dists = {"a": FloatDistribution(0.0, 2.0), "b": FloatDistribution(1e-4, 1.0, log=True),
             "n": IntDistribution(0, 10)}
    opt = CmaOptimizer(dists, LOSS, seed=0, x0={"a": 1.5, "b": 1e-2}, sigma0=1e-6, CMA_diagonal=True)
    study = make_study(opt)
    for t in opt.ask(study, 20):
        assert t.params["a"] == pytest.approx(1.5, abs=1e-4)
        assert t.params["b"] == pytest.approx(1e-2, rel=1e-3)
        assert t.params["n"] == 5 and isinstance(t.params["n"], int)
        assert t.distributions == dists
    cube = _unit_cube.UnitCube(dists)
    assert cube.to_unit({"a": 0.5, "b": 1e-3, "n": 10}).tolist() == pytest.approx([0.25, 0.25, 1.0])


def test_cma_scalarizes_several_objectives():
    scal = Scalarization("weighted_sum", (1.0, 0.5))
    opt = build_optimizer("cma", space(), TWO, scalarization=scal, seed=0, options={"popsize": 4})
    assert opt.directions() == ["maximize"]
    study = make_study(opt)
    for t in opt.ask(study, 4):
        opt.tell(study, t, [1 - sphere(t.params), t.params["w0"]])
    for t in study.trials:
        acc, size = t.user_attrs["scores"]["acc"], t.user_attrs["scores"]["size"]
        assert t.value == pytest.approx(acc - 0.5 * size)
    assert opt.last_values == pytest.approx([t.value for t in study.trials])


# --------------------------------------------------------------------------- samplers

SAMPLER_OPTIONS = {
    "tpe": {"n_startup_trials": 3},
    "nsga2": {"population_size": 4},
    "nsga3": {"population_size": 4},
    "gp": {"n_startup_trials": 4},
    "random": {},
}


def two_objectives(params: dict) -> list[float]:
    return [1.0 - sphere(params), params["w0"] + params["w1"]]


@pytest.mark.parametrize("name", sorted(SAMPLER_OPTIONS))
def test_multi_objective_samplers_record_every_objective(name):
    opt = build_optimizer(name, space(3), TWO, seed=0, options=SAMPLER_OPTIONS[name])
    assert opt.supports_multi_objective and opt.directions() == ["maximize", "minimize"]
    study = make_study(opt)
    assert [d.name.lower() for d in study.directions] == opt.directions()
    for _ in range(4):
        batch = opt.ask(study, 2)
        assert len(batch) == 2
        for t in batch:
            assert set(t.params) == set(space(3))
            opt.tell(study, t, two_objectives(t.params))
    assert len(study.trials) == 8
    for t in study.trials:
        assert t.state == TrialState.COMPLETE and t.values == pytest.approx(two_objectives(t.params))
    assert study.best_trials


def test_sampler_with_scalarization_optimizes_one_value():
    scal = Scalarization("chebyshev", (1.0, 1.0))
    opt = build_optimizer("tpe", space(3), TWO, scalarization=scal, seed=1, options={"n_startup_trials": 2})
    assert opt.directions() == ["maximize"]
    study = make_study(opt)
    for _ in range(3):
        for t in opt.ask(study, 2):
            opt.tell(study, t, two_objectives(t.params))
    assert all(len(t.values) == 1 and t.value <= 0 for t in study.trials)
    assert all(set(t.user_attrs["scores"]) == {"acc", "size"} for t in study.trials)


def test_cmaes_sampler_single_objective(monkeypatch):
    pytest.importorskip("cmaes")
    scal = Scalarization("weighted_sum", (1.0, 1.0))
    opt = build_optimizer("cmaes", space(3), TWO, scalarization=scal, seed=0, options={"popsize": 4})
    assert not opt.supports_multi_objective and opt.directions() == ["maximize"]
    study = make_study(opt)
    for _ in range(4):
        for t in opt.ask(study, 3):
            opt.tell(study, t, two_objectives(t.params))
    assert len(study.trials) == 12 and all(t.state == TrialState.COMPLETE for t in study.trials)


def test_cmaes_without_its_package_is_a_config_error(monkeypatch):
    real = samplers.importlib.util.find_spec
    monkeypatch.setattr(
        samplers.importlib.util, "find_spec", lambda n, *a: None if n == "cmaes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="needs the 'cmaes' package"):
        build_optimizer("cmaes", space(), LOSS)


def test_sampler_resume_reseeds_instead_of_replaying_draws():
    opt = build_optimizer("random", space(), LOSS, seed=3)
    study = make_study(opt)
    first = [t.params for t in opt.ask(study, 3)]
    again = build_optimizer("random", space(), LOSS, seed=3)
    study.sampler = again.sampler()
    again.restore(study)
    assert study.sampler is again.sampler()
    assert [t.params for t in again.ask(study, 3)] != first


def test_sampler_refuses_a_study_with_another_sampler():
    opt = build_optimizer("tpe", space(), LOSS, seed=0)
    study = optuna.create_study(directions=opt.directions())
    with pytest.raises(ValueError, match="sampler=optimizer.sampler"):
        opt.ask(study, 1)


# --------------------------------------------------------------------------- waiting trials


def test_waiting_trials_are_asked_first_by_cma():
    opt = CmaOptimizer(space(), LOSS, seed=0, popsize=4)
    study = make_study(opt)
    study.enqueue_trial({"w0": 0.5, "w1": 0.5, "w2": 0.5, "density": 0.5}, user_attrs={"baseline": "mean"})
    first = opt.ask(study, 3)
    assert first[0].user_attrs == {"baseline": "mean"} and first[0].params["density"] == 0.5
    assert [t.user_attrs.get("cma_index") for t in first[1:]] == [0, 1]
    opt.tell(study, first[0], [0.0])  # a baseline is recorded, not given to pycma
    for t in first[1:]:
        opt.tell(study, t, [sphere(t.params)])
    study.enqueue_trial({"w0": 0.1})  # enqueued mid-generation: still first in line
    rest = opt.ask(study, 3)
    assert rest[0].params["w0"] == 0.1 and "cma_index" not in rest[0].user_attrs
    assert [t.user_attrs["cma_index"] for t in rest[1:]] == [2, 3]
    for t in rest:
        opt.tell(study, t, [sphere(t.params)])
    assert opt.generation == 1 and len(study.trials) == 6


def test_waiting_trials_are_asked_first_by_a_sampler():
    opt = build_optimizer("tpe", space(), TWO, seed=0)
    study = make_study(opt)
    study.enqueue_trial({"w0": 0.25, "w1": 0.75, "w2": 0.0, "density": 0.01})
    batch = opt.ask(study, 3)
    assert batch[0].params == {"w0": 0.25, "w1": 0.75, "w2": 0.0, "density": 0.01}
    assert len(batch) == 3 and all(set(t.params) == set(space()) for t in batch)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: build_optimizer("bayes", space(), LOSS), "unknown optimizer 'bayes': expected one of cma"),
        (lambda: build_optimizer("tpe", space(), LOSS, options={"n_startup": 3}),
         "optimizer 'tpe' has no option 'n_startup'"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"popsiz": 3}), "optimizer 'cma' has no option 'popsiz'"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"seed": 3}), "optimizer 'cma' has no option 'seed'"),
        (lambda: build_optimizer("cma", space(), TWO + [Objective("x", "minimize")]),
         "optimizer 'cma' optimizes one objective; 3 objectives were given: add a scalarization "
         "(weighted_sum or chebyshev)"),
        (lambda: build_optimizer("cmaes", space(), TWO), "optimizer 'cmaes' optimizes one objective; 2"),
        (lambda: build_optimizer("tpe", space(), TWO, scalarization=Scalarization("weighted_sum", (1.0,))),
         "scalarization has 1 weights for 2 objectives"),
        (lambda: Scalarization("weighted_sum", (1.0, -0.5)), "weight -0.5 (position 1) is invalid"),
        (lambda: Scalarization("weighted_sum", (0.0, 0.0)), "weights are all zero"),
        (lambda: Scalarization("pareto", (1.0,)), "kind 'pareto' is unknown"),
        (lambda: Objective("acc", "up"), "direction 'up'"),
        (lambda: build_optimizer("nsga2", space(), TWO, options={"population_size": 1}),
         "optimizer 'nsga2': bad option value"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"x0": {"nope": 1}}), "x0 names 'nope'"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"sigma0": -1}), "sigma0 must be > 0"),
        (lambda: build_optimizer("cma", {"x": FloatDistribution(0, 1)}, LOSS), "at least 2 parameters"),
        # option values of the wrong type: refused up front, not a TypeError deep in the sampler mid-search
        (lambda: build_optimizer("tpe", space(), LOSS, options={"n_startup_trials": "x"}),
         "optimizer 'tpe': option n_startup_trials takes int, got 'x'"),
        (lambda: build_optimizer("tpe", space(), LOSS, options={"n_startup_trials": True}), "n_startup_trials takes int, got True"),
        (lambda: build_optimizer("nsga2", space(), TWO, options={"crossover_prob": "high"}), "crossover_prob takes float, got 'high'"),
        (lambda: build_optimizer("gp", space(), LOSS, options={"deterministic_objective": "maybe"}), "takes bool, got 'maybe'"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"restarts": "x"}), "option restarts must be a number, got 'x'"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"popsize": 4.5}), "option popsize must be a whole number, got 4.5"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"penalty": "low"}), "option penalty must be a number, got 'low'"),
        (lambda: build_optimizer("cma", space(), LOSS, options={"tolfun": "abc"}),
         "option tolfun must be a number (pycma's default is 1e-11), got 'abc'"),
    ],
)
def test_config_errors_are_one_line(call, needle):
    with pytest.raises(ConfigError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_option_values_yaml_reads_as_text_are_taken_as_numbers():
    """YAML reads ``1e-3`` (no dot) and quoted numbers as strings; the samplers get the numbers."""
    options = yaml.safe_load("mutation_prob: 1e-3\npopulation_size: '6'")
    assert options == {"mutation_prob": "1e-3", "population_size": "6"}
    opt = build_optimizer("nsga2", space(), TWO, seed=0, options=options)
    assert opt.sampler()._population_size == 6 and opt.sampler()._child_generation_strategy._mutation_prob == 0.001
    cma_opt = build_optimizer("cma", space(), LOSS, seed=0, options=yaml.safe_load("tolfun: 1e-3\nmaxiter: 100*N"))
    assert cma_opt._es.opts.eval("tolfun") == 0.001 and cma_opt._es.opts.eval("maxiter") == 100 * len(space())


def test_registry_names():
    assert sorted(OPTIMIZERS) == ["cma", "cmaes", "gp", "nsga2", "nsga3", "random", "tpe"]
    assert {n for n, c in OPTIMIZERS.items() if c.supports_multi_objective} == {"gp", "nsga2", "nsga3", "random", "tpe"}


# --------------------------------------------------------------------------- scalarization


def test_weighted_sum_by_hand():
    objs = [Objective("acc", "maximize"), Objective("loss", "minimize"), Objective("f1", "maximize")]
    s = Scalarization("weighted_sum", (2.0, 0.5, 0.0))
    assert s([0.7, 3.0, 123.0], objs) == pytest.approx(2 * 0.7 - 0.5 * 3.0)


def test_chebyshev_by_hand():
    objs = [Objective("acc", "maximize"), Objective("loss", "minimize")]
    ref = Scalarization("chebyshev", (1.0, 0.25), reference=(1.0, 0.0))
    # distances: acc 1*(1.0-0.6)=0.4, loss 0.25*(2.0-0.0)=0.5 -> -0.5
    assert ref([0.6, 2.0], objs) == pytest.approx(-0.5)
    # beating the reference still counts: loss below 0 reduces its term
    assert ref([0.9, -1.0], objs) == pytest.approx(-0.1)
    ideal = Scalarization("chebyshev", (1.0, 1.0))
    # ideal (0.9, 1.0): distances 0.3 and 0.5 -> -0.5
    assert ideal([0.6, 1.5], objs, ideal=[0.9, 1.0]) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        ideal([0.6, 1.5], objs)


def test_chebyshev_ideal_is_the_best_seen_so_far():
    opt = build_optimizer("random", space(), [Objective("acc", "maximize"), Objective("loss", "minimize")],
                          scalarization=Scalarization("chebyshev", (1.0, 1.0)), seed=0)
    study = make_study(opt)
    a, b, c = opt.ask(study, 3)
    opt.tell(study, a, [0.5, 2.0])  # ideal = itself -> 0
    opt.tell(study, b, [0.8, 3.0])  # ideal (0.8, 2.0): distances 0, 1 -> -1
    opt.tell(study, c, [0.6, 1.0])  # ideal (0.8, 1.0): distances 0.2, 0 -> -0.2
    assert [t.value for t in study.trials] == pytest.approx([0.0, -1.0, -0.2])
    # a restored optimizer rebuilds the ideal from the recorded scores
    again = build_optimizer("random", space(), opt.objectives, scalarization=opt.scalarization, seed=0)
    again.restore(study)
    assert again.study_values([0.7, 1.5]) == pytest.approx([-0.5])


def test_unscalarized_values_and_directions():
    opt = build_optimizer("cma", space(), LOSS, seed=0)
    assert opt.directions() == ["minimize"] and opt.study_values([1.5]) == [1.5]
    assert opt.scalar_value([1.5]) == -1.5
    assert build_optimizer("nsga2", space(), TWO).study_values([0.5, 2]) == [0.5, 2.0]

