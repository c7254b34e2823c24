"""``annotate models list|pull|check``: what models exist, fetching them ahead of a run, and
trying a model spec on a real face before a long run."""

from __future__ import annotations

from pathlib import Path

import click

from annotator.commands.options import cache_dir, spec_error
from engines.cache import cached, resolve
from engines.registry import get_entry, list_models
from engines.int8 import int8_onnx, int8_sha256
from engines.sources import FetchError


@click.group()
def models() -> None:
    """List and pull the models the annotator runs."""


@models.command("list")
@cache_dir
def list_command(cache_dir: Path | None) -> None:
    """Show every registered model: kind, source, licence, and whether it is cached.

    \b
    Examples:
      annotate models list
      annotate models list --cache-dir /shared/annotator-cache
    """
    rows = [("name", "kind", "cached", "size", "source", "licence")]
    for entry in list_models():
        hit = cached(entry, cache_dir)
        size = f"{hit.onnx.stat().st_size / 1e6:.1f} MB" if hit else "-"
        rows.append((entry.name, entry.kind, "yes" if hit else "no", size, entry.source.describe(), entry.licence))
    # Columns as wide as their longest cell; the licence last and whole (some name several parts).
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        click.echo("  ".join([*cells, row[-1]]))


@models.command("pull")
@click.argument("names", nargs=-1)
@cache_dir
def pull_command(names: tuple[str, ...], cache_dir: Path | None) -> None:
    """Fetch, convert and verify models (default: the default detector and scorer).

    \b
    Examples:
      annotate models pull
      annotate models pull retinaface-mnv2 fer-minixception
    """
    from annotator.config import DEFAULT_DETECTOR, DEFAULT_SCORER

    try:
        entries = [get_entry(n) for n in (names or (DEFAULT_DETECTOR, DEFAULT_SCORER))]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAMES") from None
    for entry in entries:
        try:
            artifacts = resolve(entry, cache_dir)
            # A detector's int8 copy for keyframes on a CPU (--int8-keyframes), so runs need nothing more.
            keyframes = int8_onnx(artifacts, cache_dir) if entry.kind == "detector" else None
        except FetchError as exc:
            raise click.ClickException(str(exc)) from None
        extra = f", int8 copy for keyframes sha256 {int8_sha256(keyframes)[:12]}" if keyframes else ""
        click.echo(f"{entry.name}: {artifacts.onnx.parent} (onnx sha256 {artifacts.sha256['model.onnx'][:12]}{extra})")


@models.command("check")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False, path_type=Path))
@cache_dir
def check_command(spec_path: Path, cache_dir: Path | None) -> None:
    """Run the model a spec describes on a shipped face and print what it predicts.

    The face is scikit-image's astronaut (a smiling Eileen Collins), found by RetinaFace and
    cut as the spec says. Look at the input statistics (do they match what the model was
    trained on?) and the prediction (a smile should come out as happiness). A bad spec is one
    line naming the key, exit code 2.

    \b
    Examples:
      annotate models check affectnet8/model.toml
    """
    from engines.spec import SpecError
    from engines.spec_check import check_on_astronaut

    try:
        report = check_on_astronaut(spec_path, cache_dir)
    except SpecError as exc:
        raise spec_error(str(exc)) from None
    except FetchError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report.lines():
        click.echo(line)
