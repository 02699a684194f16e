"""The `omgseg` command line.

Each subcommand imports what it needs when it runs, so `omgseg --help` answers at once.
Bad input exits with status 1 and one clear line on stderr; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EPILOG = """examples:
  omgseg synth --out outputs/synth --seed 0
  omgseg convert coco-panoptic --src outputs/synth/coco --out outputs/shards/coco/train --split train
  omgseg shards verify outputs/shards/coco/train
  omgseg prepare --config studies/configs/default.yaml
  omgseg train --config studies/configs/train_tiny.yaml steps=100
  omgseg predict --checkpoint model.pt --task panoptic --input images/ --out predictions/
  omgseg eval coco-panoptic --gt-json gt.json --gt-dir gt/ --pred-json pred.json --pred-dir pred/
  omgseg eval interactive --gt-json gt.json --gt-dir gt/ --image-dir val2017/ --checkpoint model.pt
  omgseg study --config studies/configs/default.yaml
  omgseg recommend outputs/studies/planted --objective anchor
  omgseg report outputs/studies/default
  omgseg query "SELECT * FROM influence WHERE kind = 'pair'" --tables outputs/studies/default
  omgseg ui outputs/studies/default
  omgseg model-info omgseg_convnext_large
"""


# Subcommands whose own module parses their arguments: {name: (module, help)}.
PASSTHROUGH = {
    "study": ("omgseg.platform.study.driver", "run a co-training study (Ray Tune trials, MLflow, influence tables)"),
    "recommend": ("omgseg.platform.study.recommend", "recommend data sets and mixing ratios for an objective from a study"),
    "report": ("omgseg.dashboards.report", "write a study's HTML report and PNG figures"),
    "query": ("omgseg.dashboards.query", "SQL over study tables (Polars)"),
    "ui": ("omgseg.dashboards.ui", "start the MLflow UI on a study's tracking store (127.0.0.1)"),
}


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from omgseg.datasets.synth import SYNTH_FORMATS

    p = sub.add_parser("synth", help="write small synthetic data sets in the public formats")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per format)")
    p.add_argument(
        "--formats",
        default=",".join(SYNTH_FORMATS),
        help=f"comma-separated formats (default: all: {','.join(SYNTH_FORMATS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.set_defaults(func=_cmd_synth)



def _cmd_synth(args: argparse.Namespace) -> int:
    from omgseg.datasets.synth import write_synthetic

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    written = write_synthetic(Path(args.out), formats=formats, seed=args.seed, progress=True)
    print(json.dumps({name: str(path) for name, path in written.items()}))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from omgseg.datasets.formats import FORMATS

    p = sub.add_parser("convert", help="convert a data set in its public layout to WebDataset shards")
    p.add_argument("format", choices=sorted(FORMATS), help="source format")
    p.add_argument("--src", required=True, help="source folder in the format's layout (docs/datasets.md)")
    p.add_argument("--out", required=True, help="shard folder to write")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--samples-per-shard", type=int, default=64, metavar="N")
    p.add_argument("--clip-length", type=int, default=None, metavar="T",
                   help="cut videos into clips of T frames (default: whole videos)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes writing shards at once (default: one per core); the shards are the same for any N")
    p.add_argument("--val-from-train", type=_held_out_amount, default=None, metavar="F|N",
                   help="hold out a fraction F (< 1) or a count N of the train images or videos, by id: --split val "
                   "writes them, --split train the rest (for a data set whose val split has no annotations)")
    p.set_defaults(func=_cmd_convert)



def _cmd_convert(args: argparse.Namespace) -> int:
    from omgseg.datasets.convert import convert
    from omgseg.datasets.heldout import HeldOut

    heldout = None
    if args.val_from_train is not None:
        value = float(args.val_from_train)
        heldout = HeldOut(fraction=value) if value < 1 else HeldOut(count=int(value))
    manifest = convert(
        args.format,
        src=Path(args.src),
        out=Path(args.out),
        split=args.split,
        samples_per_shard=args.samples_per_shard,
        clip_length=args.clip_length,
        heldout=heldout,
        workers=args.workers,
        progress=True,
    )
    print(json.dumps({"out": args.out, "shards": len(manifest.shards), "samples": manifest.total_samples}))
    return 0


def _held_out_amount(text: str) -> str:
    """--val-from-train's value: a fraction in (0, 1) or a whole count >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.1) or a count (200), got {text!r}") from None
    if not (0 < value < 1 or (value >= 1 and value.is_integer())):
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 or a whole count, got {text!r}")
    return text


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="check or describe a shard folder")
    p.add_argument("action", choices=("verify", "stats"),
                   help="verify: re-hash every shard against manifest.json; stats: counts")
    p.add_argument("dir", help="shard folder")
    p.set_defaults(func=_cmd_shards)



def _cmd_shards(args: argparse.Namespace) -> int:
    from omgseg.datasets.shard_check import shard_stats, verify_shards

    if args.action == "verify":
        problems = verify_shards(Path(args.dir))
        for problem in problems:
            print(f"{args.dir}: {problem}", file=sys.stderr)
        print(json.dumps({"dir": args.dir, "ok": not problems, "problems": len(problems)}))
        return 1 if problems else 0
    print(json.dumps(shard_stats(Path(args.dir)), indent=2))
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="generate (if synthetic) and convert a config's data sets, cached")
    p.add_argument("--config", required=True, help="study or training config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_prepare)



def _cmd_prepare(args: argparse.Namespace) -> int:
    from omgseg.platform.config import load_run_or_study
    from omgseg.platform.data import prepare_data

    config = load_run_or_study(args.config, args.overrides)
    dirs = prepare_data(config.data, config.splits_read(), progress=True)
    print(json.dumps({name: {s: str(p) for s, p in splits.items()} for name, splits in dirs.items()}))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="co-train the model on a mix of data sets (Ray Train, MLflow)")
    p.add_argument("--config", required=True, help="training config YAML, e.g. studies/configs/train_tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=50")
    p.set_defaults(func=_cmd_train)



def _cmd_train(args: argparse.Namespace) -> int:
    from omgseg.platform.config import TrainConfig, load_config
    from omgseg.platform.console import say
    from omgseg.platform.training.train import run_training

    config = load_config(TrainConfig, args.config, args.overrides)  # fails before any worker starts
    result = run_training(config)
    report = result.report
    say(f"model: {result.checkpoint}")
    say(f"MLflow run {result.run_id}: mlflow ui --backend-store-uri {result.tracking_uri}")
    print(json.dumps({
        "run_id": result.run_id, "checkpoint": str(result.checkpoint), "run_dir": str(result.run_dir),
        "steps": report.steps, "samples": report.samples, "realised_mix": report.realised_mix,
        "metrics": {score.key: score.value for score in report.evaluation.scores()},
    }))
    return 0


@dataclass(frozen=True)
class FileFormat:
    """One format `omgseg eval` scores: the arguments it needs, what they hold, and the scorer."""

    needs: tuple[str, ...]
    about: str
    score: Callable[[argparse.Namespace], dict]


def _coco_panoptic(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.metrics.panoptic import evaluate_coco_panoptic

    return evaluate_coco_panoptic(a.gt_json, a.gt_dir, a.pred_json, a.pred_dir)


def _coco_instances(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.metrics.instance import evaluate_coco_instances

    return evaluate_coco_instances(a.gt_json, a.pred_json)


def _semantic(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.metrics.semantic import evaluate_semantic_pngs

    return evaluate_semantic_pngs(a.gt_dir, a.pred_dir, a.num_classes, a.ignore_label)


def _vipseg(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.metrics.video_panoptic import evaluate_vipseg

    return evaluate_vipseg(a.gt_json, a.gt_dir, a.pred_json, a.pred_dir)


def _ytvis(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.metrics.video_instance import evaluate_ytvis

    return evaluate_ytvis(a.gt_json, a.pred_json)


def _davis(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.metrics.vos import evaluate_davis

    return evaluate_davis(a.gt_dir, a.pred_dir)


def _interactive(a: argparse.Namespace) -> dict:
    from omgseg.platform.evaluation.clicks import evaluate_interactive_files

    return evaluate_interactive_files(Path(a.checkpoint), a.gt_json, a.gt_dir, a.image_dir, max_clicks=a.max_clicks,
                                      clip_checkpoint=a.clip_checkpoint, max_images=a.max_images)


EVAL_FORMATS = {
    "coco-panoptic": FileFormat(("gt_json", "gt_dir", "pred_json", "pred_dir"), "PQ", _coco_panoptic),
    "coco-instances": FileFormat(("gt_json", "pred_json"), "mask AP; COCO results, RLE + score", _coco_instances),
    "semantic": FileFormat(("gt_dir", "pred_dir", "num_classes"), "mIoU over label PNGs", _semantic),
    "vipseg": FileFormat(("gt_json", "gt_dir", "pred_json", "pred_dir"),
                         "VPQ; panoptic_gt_VIPSeg_<split>.json and panomasksRGB/, pred.json and pan_pred/ with one "
                         "folder of RGB id PNGs per video", _vipseg),
    "ytvis": FileFormat(("gt_json", "pred_json"), "video mask AP; YouTube-VIS results", _ytvis),
    "davis": FileFormat(("gt_dir", "pred_dir"), "J&F; one folder of palette PNGs per sequence", _davis),
    "interactive": FileFormat(("gt_json", "gt_dir", "image_dir", "checkpoint"),
                              "NoC; COCO panoptic ground truth, clicks simulated on every non-crowd segment",
                              _interactive),
}


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score predictions in a public result format against ground truth")
    p.add_argument("task", choices=tuple(EVAL_FORMATS), help="; ".join(
        f"{name}: {' '.join('--' + a.replace('_', '-') for a in f.needs)} ({f.about})" for name, f in EVAL_FORMATS.items()))
    p.add_argument("--gt-json")
    p.add_argument("--gt-dir")
    p.add_argument("--pred-json")
    p.add_argument("--pred-dir")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--ignore-label", type=int, default=255)
    p.add_argument("--image-dir", help="interactive: folder of the images the ground-truth JSON names")
    p.add_argument("--checkpoint", help="interactive: model.pt to click with")
    p.add_argument("--clip-checkpoint", help="interactive: local CLIP weights, if the model was trained with them")
    p.add_argument("--max-clicks", type=int, default=20, help="interactive: clicks per object (default 20, as RITM)")
    p.add_argument("--max-images", type=int, help="interactive: only the first N images")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.set_defaults(func=_cmd_eval)



def _cmd_eval(args: argparse.Namespace) -> int:
    fmt = EVAL_FORMATS[args.task]
    need(args, *fmt.needs)
    result = fmt.score(args)
    line = json.dumps(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        try:
            partial.write_text(line + "\n")
        except OSError as err:  # a full disk: an earlier result at `out` stays as it was
            partial.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(out)) from err
        partial.replace(out)
    print(line)
    return 0


def need(args: argparse.Namespace, *names: str) -> None:
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"eval {args.task} needs {', '.join(missing)}")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from omgseg.core.structures import Task

    p = sub.add_parser("predict", help="run a checkpoint on images or a video; write result formats and overlays")
    p.add_argument("--checkpoint", required=True, help="model.pt from omgseg train")
    p.add_argument("--task", required=True, choices=[t.value for t in Task],  # a task's name is its entry's (tasks.py)
                   help="the task (its entry in platform/tasks.py says how it reads its input and writes its results)")
    p.add_argument("--input", required=True, help="an image, a folder of images, or (video tasks) a folder of frames")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocabulary", help="shard folder or JSON with 'categories' (default: the training vocabulary)")
    p.add_argument("--coco-json", help="COCO JSON whose 'images' give the image ids of the file names")
    p.add_argument("--clip-length", type=int, default=4, help="frames per clip for video tasks")
    p.add_argument("--clip-checkpoint", help="local CLIP weights, if the model was trained with a CLIP checkpoint")
    p.add_argument("--points", help="interactive: clicks 'x,y;x,y' in pixels, one object per click")
    p.add_argument("--first-frame-mask", help="vos: palette PNG of object indices in the first frame")
    p.add_argument("--videos", help="video_panoptic with a folder of video folders: a text file of the videos to "
                   "predict, one name a line (VIPSeg's val.txt)")
    p.set_defaults(func=_cmd_predict)



def _cmd_predict(args: argparse.Namespace) -> int:
    from omgseg.core.structures import Task
    from omgseg.platform.evaluation.predict import PredictRequest, predict

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    summary = predict(PredictRequest(
        checkpoint=Path(args.checkpoint), task=Task.parse(args.task), inputs=Path(args.input), out=Path(args.out),
        vocabulary=args.vocabulary, coco_json=path(args.coco_json), clip_length=args.clip_length,
        clip_checkpoint=args.clip_checkpoint, points=args.points, first_frame_mask=path(args.first_frame_mask),
        videos=path(args.videos)))
    print(json.dumps({"task": summary.task, "inputs": summary.inputs, "outputs": summary.outputs}))
    return 0


def _add_model_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter counts of a model config, without weights")
    p.add_argument("config", help="model config preset: tiny or omgseg_convnext_large")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model config overrides, e.g. clip_model=RN50, clip_model=ViT-B-16, "
                   "clip_pretrained=laion2b_s34b_b79k, decoder.num_layers=3")
    p.set_defaults(func=_cmd_model_info)



def _cmd_model_info(args: argparse.Namespace) -> int:
    import torch

    from omgseg.model.config import model_config, with_overrides
    from omgseg.model.omgseg import OMGSeg, parameter_counts
    from omgseg.platform.config import parse_override

    overrides = {}
    for text in args.overrides:
        path, value = parse_override(text)
        overrides[".".join(path)] = value
    config = with_overrides(model_config(args.config), overrides)
    # Built with random weights (or the clip_checkpoint / clip_pretrained given) on the CPU
    # (open_clip cannot build on the meta device); the paper-size model takes about 1.5 GB.
    torch.manual_seed(0)
    model = OMGSeg(config)
    print(json.dumps({
        "config": config.name,
        "clip_model": config.clip_model,
        "clip_tower": model.backbone.family,
        "clip_weights": config.clip_checkpoint or config.clip_pretrained or "random",
        "input_size": list(config.input_size),
        "num_object_queries": config.decoder.num_object_queries,
        "parameters": parameter_counts(model),
    }))
    return 0


def _add_passthrough(sub: argparse._SubParsersAction) -> None:
    """Commands with parsers of their own, listed here for `omgseg --help` (main runs them)."""
    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{text}; `omgseg {name} --help` for its options", add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omgseg",
        description="One segmentation model for every task, and the platform that measures "
        "how tasks help or hurt each other when co-trained.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_convert, _add_shards, _add_prepare, _add_train, _add_predict, _add_eval, _add_passthrough,
                _add_model_info):
        add(sub)  # in the order `omgseg --help` lists them
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:  # commands with parsers of their own (also run as scripts)
        import importlib

        command = importlib.import_module(PASSTHROUGH[argv[0]][0])
        return command.main(argv[1:], prog=f"omgseg {argv[0]}")
    from omgseg.datasets.manifest import ShardReadError
    from omgseg.platform.console import TrainingFailed

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ShardReadError, TrainingFailed) as err:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"omgseg {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk is the machine's state, not a bug: one line, which names the file being written.
        print(f"omgseg {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
