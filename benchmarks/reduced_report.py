"""A reduced report run for a loaded machine (NOT the full protocol): one riemod setting and Adam
on the given seeds, the interleaved step-time ratio on the first seed, kfac-jax's stored rows beside.

``python -m benchmarks.reduced_report {ae|mlp} OUT_NAME RIEMOD_JSON ADAM_JSON SEEDS``, e.g.
``python -m benchmarks.reduced_report ae digits-autoencoder_kronecker '{...}' '{"learning_rate":0.01}'
0,1,2``; writes ``benchmarks/results/OUT_NAME.json|.md|.png``. Use the task's own protocol
(``python -m benchmarks.task_digits_autoencoder``) when the machine is quiet enough to tune.
"""
import json
import sys
from pathlib import Path

from benchmarks import harness, protocol
from benchmarks import task_digits_autoencoder as ae
from benchmarks import task_digits_mlp as mlp_task

RESULTS = Path(__file__).parent / "results"
which, out_name = sys.argv[1], sys.argv[2]
riemod_cfg = json.loads(sys.argv[3])
adam_cfg = json.loads(sys.argv[4])
seeds = [int(s) for s in sys.argv[5].split(",")]
mod = ae if which == "ae" else mlp_task
spec = mod.spec()
machine = harness.machine_info()
runs, finals, trainers = [], {}, {}
for opt, cfg in (("adam", adam_cfg), ("riemod", riemod_cfg)):
  for seed in seeds:
    tr = spec.make_trainer(opt, dict(cfg), seed)
    r = harness.run_training(tr, spec.num_steps, thresholds=spec.thresholds, time_budget_s=None)
    r["seed"] = seed
    if seed == seeds[0]:
      finals[opt], trainers[opt] = r["_state"], tr
    r.pop("_state")
    th = {k: (v["steps"], v["seconds"]) for k, v in r["thresholds"].items()}
    print(opt, seed, r["final"], th, f"{r['median_step_seconds']*1e3:.2f} ms", r["diverged"], flush=True)
    runs.append(r)
timing = harness.interleaved_step_times([trainers[n] for n in ("adam", "riemod")],
                                        [finals[n] for n in ("adam", "riemod")], rounds=5, burst=10,
                                        reference="adam")
print(json.dumps(timing["optimizers"], default=str), flush=True)
ext = protocol.load_external([RESULTS / f"kfac_{spec.name}.json"], spec.name)
for r in runs:
  t = timing["optimizers"].get(r["optimizer"])
  if t:
    r["interleaved_median_step_seconds"] = t["median_step_seconds"]
    r["ratio_to_adam"] = t.get("ratio_to_adam")
payload = {"task": spec.name, "num_steps": spec.num_steps, "thresholds": spec.thresholds,
           "tuning_seeds": [100], "report_seeds": seeds, "grids": {"riemod": [riemod_cfg], "adam": [adam_cfg]},
           "chosen": {"riemod": {"hyperparameters": riemod_cfg}, "adam": {"hyperparameters": adam_cfg}},
           "not_run": {}, "tuning": [], "runs": runs + ext, "interleaved_timing": timing,
           "machine": machine, "loadavg_end": harness.machine_info()["loadavg"],
           "notes": "REDUCED RUN (not the full protocol): riemod's Kronecker-mass setting picked on seed 100 "
                    "only by hand, Adam at the protocol's chosen learning rate, kfac-jax rows from the stored "
                    "kfac_" + spec.name + ".json (its own environment, an earlier quieter run). Machine shared "
                    "with ~8 other jobs (load in the machine line): seconds are loaded; compare steps and the "
                    "interleaved ratio.", "final_keys": list(spec.final_keys)}
spec.name = out_name
protocol.write_outputs(spec, RESULTS, payload)
