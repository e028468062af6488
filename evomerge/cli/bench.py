"""``evomerge bench``: the benchmarks (merge, scale, align, search, quality, evaluate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evomerge.cli._common import executor_kinds, _alpha_grid, _floats, _ints, _names
from evomerge.errors import ConfigError


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark and print its table (or JSON)",
        description="Benchmarks print ratios measured in the same run.",
    )
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    m = bsub.add_parser(
        "merge",
        help="time merge_into per method against the memory-traffic floor",
        description="Time MergeEngine.merge_into for each merge method on a synthetic "
        "Llama model with 3 fine-tuned sources, float32 and bfloat16, next to the time to copy "
        "the bytes the merge must read and write (the floor): a new candidate per merge, the same "
        "recipe again, and a fresh process's first merge with the compile cache cold and warm.",
    )
    m.add_argument("--params", type=float, default=110e6, help="model size in parameters (default: 1.1e8)")
    m.add_argument("--sources", type=int, default=3, help="fine-tuned sources besides the base (default: 3)")
    m.add_argument("--repeats", type=int, default=5, help="timed repeats per method; the median is kept (default: 5)")
    m.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    m.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the sources and the live model (default: float32,bfloat16)")
    m.add_argument("--no-first-merge", action="store_true", help="skip the fresh-process first merges (cold and warm compile cache)")
    m.add_argument("--adapters", type=int, metavar="RANK", help="instead: 3 LoRA adapters of this rank against the same adapters merged into full models (default methods: linear, task_arithmetic, ties)")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    m.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp folder)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(handler=_run_bench_merge)

    sc = bsub.add_parser(
        "scale",
        help="memory, disk and time per parameter of merging, and a prediction for a real model",
        description="Per method and number of fine-tunes, a fresh process merges candidates of a bfloat16 "
        "family into a bfloat16 live model and reports its private memory beyond the live model, device "
        "memory (CUDA), bytes written to disk, first and later merge time against the memory floor; a line "
        "through the sizes gives bytes per parameter. --config predicts a real model's merge on a GPU "
        "(examples/configs/ holds Llama-3.1-8B and -70B).",
    )
    sc.add_argument("--params", default="1e8,3e8", help="family sizes, comma-separated (default: 1e8,3e8)")
    sc.add_argument("--sources", default="2,4", help="fine-tunes besides the base, comma-separated (default: 2,4)")
    sc.add_argument("--methods", default=None, help="comma-separated methods (default: linear, task_arithmetic, ties, dare_ties, breadcrumbs, della, slerp, model_stock)")
    sc.add_argument("--config", action="append", default=[], type=Path, metavar="CONFIG_JSON", help="predict for this model config (repeatable)")
    sc.add_argument("--device", default="cpu", help="where to merge: cpu or cuda (default: cpu)")
    sc.add_argument("--device-memory", default="80GB", help="GPU size of the prediction (default: 80GB)")
    sc.add_argument("--threads", type=int, default=None, help="torch threads per probe (default: all cores)")
    sc.add_argument("--workdir", type=Path, default=None, help="where the families go (default: a temp folder)")
    sc.add_argument("--eager", default="", help="methods also probed with eager kernels (the GPU's), such as ties,dare_ties: their "
                    "temporaries against the engine's workspace bound (slow on a CPU; default: none)")
    sc.add_argument("--json", action="store_true", help="print JSON")
    sc.set_defaults(handler=_run_bench_scale)

    al = bsub.add_parser(
        "align",
        help="midpoint barrier of two unrelated models: unaligned, weight, activation, mudsc, ensemble",
        description="Compare the endpoints, their output ensemble and the midpoint (A + B) / 2 "
        "without alignment and after weight, activation and mudsc alignment (each alpha of the "
        "grid, and alpha chosen on validation), then that alignment after --refine steps of learned "
        "refinement. By default the zoo's two independently initialized bases, scored on the "
        "held-out test split. Checks whether mudsc, and refined mudsc, at least halve the unaligned "
        "midpoint barrier.",
    )
    al.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder, built if missing (default: zoo)")
    al.add_argument("--reference", help="model A instead of the zoo's (needs --model, --evaluator, --data)")
    al.add_argument("--model", help="model B instead of the zoo's")
    al.add_argument("--evaluator", help="evaluator preset or .jsonl/text file (with --reference/--model)")
    al.add_argument("--data", help="activation data: evaluator preset or .jsonl/text file (with --reference/--model)")
    al.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="mudsc alpha grid (default: 0,0.25,0.5,0.75,1)")
    al.add_argument("--steps", type=int, default=3, help="points on each path, endpoints included (default: 3)")
    al.add_argument("--refine", type=int, default=500, metavar="STEPS", help="steps of learned refinement of the chosen mudsc alignment, one more row (default: 500; 0: no such row)")
    al.add_argument("--limit", type=int, help="test examples per skill (zoo only; default: all)")
    al.add_argument("--search", action="store_true", help="also run the same search over two independently initialized specialists with and without alignment (zoo only)")
    al.add_argument("--skills", default="add,reverse", help="with --search: A's skill (from base) and B's (fine-tuned from base_alt) (default: add,reverse)")
    al.add_argument("--trials", type=int, default=60, help="with --search: trials per search (default: 60)")
    al.add_argument("--seeds", default="0,1,2", help="with --search: one search of each kind per seed (default: 0,1,2)")
    al.add_argument("--workdir", type=Path, default=Path("runs/bench_align"), help="with --search: where B and the runs go (default: runs/bench_align)")
    al.add_argument("--json", action="store_true", help="print JSON")
    al.set_defaults(handler=_run_bench_align)

    se = bsub.add_parser(
        "search",
        help="search throughput and worker memory: serial, ray x1, ray x2 on the zoo; --real: against the mergekit-yaml loop",
        description="Run the same search on the offline zoo with the serial executor and with Ray "
        "(1 and 2 workers by default): candidates per minute, the share of worker time spent outside "
        "merge + evaluate (steady state: after actor start-up and one warm-up job per worker), and "
        "resident memory per worker; then what an extra worker adds in memory on a larger synthetic model. "
        "With --real DIR: the search of examples/real_llm.yaml on that real family against the loop a user would "
        "write around mergekit (mergekit-yaml to disk, from_pretrained, the same evaluators) on the same recipes: "
        "candidates per hour of both, their ratio, and evomerge's time outside merge and evaluate.",
    )
    se.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder, built if missing (default: zoo)")
    se.add_argument("--trials", type=int, default=24, help="trials per timed search (default: 24)")
    se.add_argument("--workers", default=None, help="Ray worker counts to time, comma-separated (default: 1,2; one count with --real, default 2)")
    se.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker (default: 1)")
    se.add_argument("--optimizer", default=None, help="sampler of the timed searches (default: random; cma with --real)")
    se.add_argument("--limit", type=int, default=None, help="examples per skill and candidate (default: all of the validation split; 50 with --real)")
    se.add_argument("--real", type=Path, default=None, metavar="DIR",
                    help="instead: the real family in DIR (evomerge zoo --real), evomerge's search with --workers Ray workers against "
                    "the loop a user would write (mergekit-yaml to disk, from_pretrained, the same evaluators) on the same recipes; "
                    "candidates per hour of both (issue 19: at least 5x)")
    se.add_argument("--loop-candidates", type=int, default=4, help="with --real: recipes the mergekit loop merges and scores (default: 4)")
    se.add_argument("--mergekit", type=Path, default=None, help="with --real: mergekit-yaml of mergekit's own environment "
                    "(default: .venv-mergekit/bin/mergekit-yaml, which `make parity` installs)")
    se.add_argument("--memory-params", type=float, default=1e8, help="model size of the memory probe; 0 skips it (default: 1e8)")
    se.add_argument("--members-params", type=float, default=0, help="model size of the members probe: ray x2 keeping Pareto members on a bfloat16 family "
                    "(driver memory, workers' time writing members); 0 skips it (default: 0; issue 17 measures 1e9)")
    se.add_argument("--members-trials", type=int, default=10, help="trials of the members probe (default: 10)")
    se.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temp folder)")
    se.add_argument("--json", action="store_true", help="print JSON")
    se.add_argument("--no-holdout", action="store_true", help="skip the widest pool's search with front members re-scored on the test split "
                    "(candidates per minute against the same search without it; issue 19: at least 0.8x)")
    se.set_defaults(handler=_run_bench_search)

    qu = bsub.add_parser(
        "quality",
        help="searched merges vs specialists, uniform average, task arithmetic, TIES, DARE-TIES on held-out data",
        description="On the offline zoo, score on the test split: each specialist, the base, the uniform "
        "average, task arithmetic with the best lambda of a 0.1-step grid (chosen on validation), TIES and "
        "DARE-TIES with mergekit's defaults and with density 0.5; then run one search per optimizer (on "
        "validation) and add its front members best per skill and best on the mean, with the margins.",
    )
    qu.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder: the demo zoo (built if missing) or a real family from zoo --real (default: zoo)")
    qu.add_argument("--skills", default="reverse,count", help="zoo skills merged, comma-separated (default: reverse,count)")
    qu.add_argument("--optimizers", default="nsga2,cma", help="one search per optimizer, comma-separated (default: nsga2,cma)")
    qu.add_argument("--trials", type=int, default=100, help="trials per search (default: 100)")
    qu.add_argument("--executor", choices=executor_kinds(), default="serial", help="where candidates run (default: serial)")
    qu.add_argument("--workers", type=int, default=1, help="parallel workers of each search (default: 1)")
    qu.add_argument("--seed", type=int, default=0, help="seed of every search (default: 0)")
    qu.add_argument("--runs-dir", type=Path, default=None, help="keep the searches' run folders here (default: a temp folder)")
    qu.add_argument("--limit", type=int, default=None, help="examples per skill and split, for a quick look (default: all 500)")
    qu.add_argument("--search-space", default=None, help="search space preset of the searches (default: ties_layerwise; lora_ties_layerwise with --lora)")
    qu.add_argument("--lora", action="store_true", help="merge the zoo's LoRA specialists (trained once, next to the zoo) instead of its full fine-tunes")
    qu.add_argument("--json", action="store_true", help="print JSON")
    qu.set_defaults(handler=_run_bench_quality)

    df = bsub.add_parser(
        "dataflow",
        help="data-flow search on the zoo: depth pruning, joint vs parameter-only, routing cost",
        description="On the zoo: a data-flow search with layer count as a second objective (the best member of at "
        "most 75% of the base depth against the best full-depth one, on test, the front plotted); a joint "
        "parameter + data-flow search against the parameter-only one at the same number of evaluations (held-out "
        "means); and what routing a candidate costs (time, weight bytes) on the zoo and on a synthetic family.",
    )
    df.add_argument("--zoo", type=Path, default=None, help="zoo folder, built if missing (default: $EVOMERGE_ZOO_CACHE or .cache/zoo)")
    df.add_argument("--prune-skill", default="add", help="skill of the pruning search (default: add)")
    df.add_argument("--skills", default="reverse,count", help="skills of the joint vs parameter-only searches (default: reverse,count)")
    df.add_argument("--trials", type=int, default=60, help="evaluations per search (default: 60)")
    df.add_argument("--optimizer", default="nsga2", help="optimizer of every search (default: nsga2)")
    df.add_argument("--joint-optimizer", default=None, help="optimizer of the joint and parameter-only searches; cma or cmaes "
                    "search the skills' mean accuracy (default: --optimizer)")
    df.add_argument("--seed", type=int, default=0, help="seed of every search (default: 0)")
    df.add_argument("--parts", default="routing,prune,joint", help="parts to run, comma-separated (default: all three)")
    df.add_argument("--params", type=float, default=5e7, help="size of the synthetic family routed (default: 5e7)")
    df.add_argument("--limit", type=int, default=None, help="examples per skill and split, for a quick look (default: all)")
    df.add_argument("--runs-dir", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    df.add_argument("--plot", type=Path, default=None, help="write the pruning front here (PNG)")
    df.add_argument("--json", action="store_true", help="print JSON")
    df.set_defaults(handler=_run_bench_dataflow)

    ev = bsub.add_parser(
        "evaluate",
        help="evaluator speed: evomerge vs lm-eval's HF backend on a model (--model, --evaluator), or on a zoo model",
        description="With --model DIR --evaluator PRESET (a dataset evaluator, multiple_choice or generate): "
        "score the model with evomerge's evaluator and with lm-eval's HF backend (a task YAML over the same "
        "rows), in one run; print both accuracies, the throughput ratio, scored tokens per second and the "
        "fraction of the machine's matmul rate (measured in the same run) each reaches; best of --repeats. "
        "Without them: time the lm_eval evaluator's first call (tasks loaded, requests built) against "
        "later calls on the same live model (target: under a third), and the dataset evaluator on "
        "500 examples of a zoo skill (target: under 1 s on two cores). Builds the zoo if needed.",
    )
    ev.add_argument("--zoo", type=Path, default=None, help="zoo folder, built if missing (default: $EVOMERGE_ZOO_CACHE or .cache/zoo)")
    ev.add_argument("--skill", default="add", help="zoo skill whose specialist is scored (default: add)")
    ev.add_argument("--repeats", type=int, default=5, help="later calls timed; the median is kept (default: 5; with --model: the best of them)")
    ev.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ev.add_argument("--model", type=Path, default=None, help="a model folder: compare evomerge's evaluator with lm-eval's HF backend on it (needs --evaluator)")
    ev.add_argument("--evaluator", default=None, help="with --model: a dataset evaluator preset or YAML file (multiple_choice or generate)")
    ev.add_argument("--split", default=None, help="with --model: the evaluator's split (default: the preset's)")
    ev.add_argument("--limit", type=int, default=None, help="with --model: examples scored (a fixed seeded subset; default: the preset's)")
    ev.add_argument("--batch-size", type=int, default=None, help="with --model: batch size of both scorers (default: the preset's)")
    ev.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="with --model: change a field of the preset (YAML value), e.g. decoding=greedy; repeatable")
    ev.add_argument("--device", default="cpu", help="with --model: cpu or cuda (default: cpu)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(handler=_run_bench_evaluate)


def _run_bench_dataflow(args: argparse.Namespace) -> int:
    from evomerge.bench.dataflow import bench_dataflow, format_table

    parts = _names(args.parts)
    unknown = [p for p in parts if p not in ("routing", "prune", "joint")]
    if unknown:
        raise ConfigError(f"--parts: unknown part {unknown[0]!r} (known: routing, prune, joint)")
    if args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    result = bench_dataflow(zoo_dir=args.zoo, prune_skill=args.prune_skill, skills=_names(args.skills), trials=args.trials,
                            optimizer=args.optimizer, joint_optimizer=args.joint_optimizer, seed=args.seed, runs_dir=args.runs_dir,
                            plot=args.plot, limit=args.limit, n_params=args.params, parts=parts, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_evaluate(args: argparse.Namespace) -> int:
    from evomerge.bench.evaluate import bench_evaluate, format_table

    if args.model is not None or args.evaluator is not None:
        return _run_bench_evaluate_model(args)
    result = bench_evaluate(zoo_dir=args.zoo, skill=args.skill, repeats=args.repeats, threads=args.threads, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_evaluate_model(args: argparse.Namespace) -> int:
    import yaml

    from evomerge.bench.evaluate_model import bench_evaluate_model, format_table
    from evomerge.errors import ConfigError

    if args.model is None or args.evaluator is None:
        raise ConfigError("bench evaluate: --model and --evaluator go together (without both: the zoo timing)")
    options = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ConfigError(f"bench evaluate: --set {item!r}: expected FIELD=VALUE")
        options[field] = yaml.safe_load(value)
    result = bench_evaluate_model(args.model, args.evaluator, split=args.split, limit=args.limit, options=options,
                                  batch_size=args.batch_size, threads=args.threads, device=args.device, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_quality(args: argparse.Namespace) -> int:
    from evomerge.bench.quality import bench_quality, format_table

    result = bench_quality(
        zoo_dir=args.zoo,
        skills=_names(args.skills),
        optimizers=_names(args.optimizers),
        trials=args.trials,
        executor=args.executor,
        workers=args.workers,
        seed=args.seed,
        runs_dir=args.runs_dir,
        limit=args.limit,
        lora=args.lora,
        search_space=args.search_space,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_search(args: argparse.Namespace) -> int:
    if args.real is not None:
        return _run_bench_search_real(args)
    from evomerge.bench.search import bench_search, format_table

    result = bench_search(
        zoo_dir=args.zoo,
        trials=args.trials,
        ray_workers=_ints(args.workers or "1,2", "--workers"),
        cpus_per_worker=args.cpus_per_worker,
        optimizer=args.optimizer or "random",
        limit=args.limit,
        memory_params=args.memory_params,
        members_params=args.members_params,
        members_trials=args.members_trials,
        holdout=not args.no_holdout,
        workdir=args.workdir,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_search_real(args: argparse.Namespace) -> int:
    from evomerge.bench.search_real import DEFAULT_MERGEKIT, bench_search_real, format_table

    workers = _ints(args.workers or "2", "--workers")
    if len(workers) != 1:
        raise ConfigError(f"--workers: one worker count with --real, got {args.workers}")
    result = bench_search_real(
        family=args.real,
        trials=args.trials,
        workers=workers[0],
        optimizer=args.optimizer or "cma",
        limit=args.limit if args.limit is not None else 50,
        loop_candidates=args.loop_candidates,
        mergekit=args.mergekit or DEFAULT_MERGEKIT,
        workdir=args.workdir,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_merge(args: argparse.Namespace) -> int:
    from evomerge.bench.merge import bench_merge, bench_merge_adapters, format_adapter_table, format_table

    methods = args.methods.split(",") if args.methods else None
    if args.adapters is not None:
        if args.adapters < 1:
            raise ConfigError(f"--adapters must be a rank of at least 1, got {args.adapters}")
        result = bench_merge_adapters(n_params=int(args.params), n_adapters=args.sources, rank=args.adapters, repeats=args.repeats,
                                      methods=methods, threads=args.threads, workdir=args.workdir, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else format_adapter_table(result))
        return 0
    result = bench_merge(
        n_params=int(args.params),
        n_sources=args.sources,
        repeats=args.repeats,
        methods=methods,
        dtypes=_names(args.dtypes),
        threads=args.threads,
        workdir=args.workdir,
        first_merge=not args.no_first_merge,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0



def _run_bench_scale(args: argparse.Namespace) -> int:
    from evomerge.bench.scale import bench_scale, format_table

    result = bench_scale(
        params=tuple(_floats(args.params, "--params")),
        sources=tuple(_ints(args.sources, "--sources")),
        methods=_names(args.methods) if args.methods else None,
        configs=tuple(args.config),
        device=args.device,
        device_memory=args.device_memory,
        threads=args.threads,
        workdir=args.workdir,
        eager=tuple(_names(args.eager)) if args.eager else (),
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_align(args: argparse.Namespace) -> int:
    from evomerge.align.resolve import resolve_data, resolve_evaluator
    from evomerge.bench.align import bench_align, bench_align_search, format_table

    if args.search and (args.reference or args.model):
        raise ConfigError("bench align --search runs on the zoo only; leave out --reference and --model")
    seeds = _ints(args.seeds, "--seeds")
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    if args.search and len(skills) != 2:
        raise ConfigError(f"--skills: give two skills, A's and B's (got {args.skills!r})")
    alphas = _alpha_grid(args.alphas)  # a bad grid fails before the first row is scored
    evaluators = [resolve_evaluator(args.evaluator)] if args.evaluator else None
    data = resolve_data(args.data) if args.data else None
    result = bench_align(
        zoo_dir=args.zoo, reference=args.reference, model=args.model, evaluators=evaluators, data=data,
        alphas=alphas, steps=args.steps, limit=args.limit, refine=args.refine, progress=not args.json,
    )
    if args.search:
        result["search"] = bench_align_search(
            zoo_dir=args.zoo, work_dir=args.workdir, skills=skills, trials=args.trials, seeds=seeds, progress=not args.json,
        )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
