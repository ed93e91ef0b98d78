"""One ``suwen eval`` run end to end: its questions selected, the agent opened with the run's
sampling and image budget (in this process, or with ``processes`` above 1 in that many agent
processes, ``suwen.answer_processes``), every mode answered (``runner.run_evaluation``), the
report written (also when a mode stops because the model stopped answering: the report shows
what finished), and, for a ``--calibrate`` run, the calibration maps fitted and stored in the
data home.

The command parses the options into an ``EvalConfig`` and renders what comes back; progress
and notices reach it through callbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from suwen.config import Settings
from suwen.errors import SuwenError
from suwen.evaluate.benchmarks import Sample
from suwen.evaluate.calibration import CalibrationFile, load_calibration, save_calibration
from suwen.evaluate.runner import (
    Answerer,
    EvalConfig,
    ExampleAnswerers,
    ModeFailedError,
    ModeSummary,
    Progress,
    answerer_of,
    load_selected,
    processes_for_modes,
    run_evaluation,
)
from suwen.llm.base import VisionLanguageModel
from suwen.types import Mode

Notice = Callable[[str], None]


@dataclass(frozen=True)
class StoredCalibration:
    """What a ``--calibrate`` run fitted, and the file it is stored in."""

    fitted: CalibrationFile
    path: Path


@dataclass(frozen=True)
class EvalOutcome:
    """A finished run: one summary per benchmark and mode run, and the stored calibration of a
    ``--calibrate`` run (None otherwise)."""

    summaries: list[ModeSummary]
    calibration: StoredCalibration | None


def eval_settings(settings: Settings, config: EvalConfig) -> Settings:
    """The settings of the run's model client (and managed server): the run's sampling sent
    with every request, its image budget, and an image limit that admits its questions."""
    return settings.model_copy(
        update={
            "temperature": config.sampling.temperature,
            "top_p": config.sampling.top_p,
            "top_k": config.sampling.top_k,
            "repetition_penalty": config.sampling.repetition_penalty,
            "vllm_image_min_pixels": config.images.min_pixels,
            "vllm_image_max_pixels": config.images.max_pixels,
            "vllm_max_images": max(settings.vllm_max_images, config.images.max_images),
        }
    )


def select_questions(settings: Settings, config: EvalConfig) -> dict[str, list[Sample]]:
    """Each benchmark's questions the run asks (downloaded benchmarks cached in the data
    home)."""
    return load_selected(config, settings.home / "eval_cache")


def evaluate(
    settings: Settings,
    config: EvalConfig,
    samples: dict[str, list[Sample]],
    urls: Sequence[str],
    *,
    on_progress: Progress | None = None,
    on_notice: Notice | None = None,
) -> EvalOutcome:
    """Ask ``samples`` (from :func:`select_questions`) in every mode of ``config``, write the
    report into ``config.out`` and, with ``config.calibrate``, fit and store the calibration.
    A mode whose model stopped answering raises ``ModeFailedError`` after the report of what
    finished is written."""
    from suwen.evaluate.report import write_report
    from suwen.runtime import run_async

    try:
        summaries = run_async(
            _answer(eval_settings(settings, config), config, samples, urls, on_progress, on_notice)
        )
    except ModeFailedError:
        with contextlib.suppress(SuwenError):
            write_report(config.out)
        raise
    write_report(config.out)
    stored = store_calibration(settings, config.out) if config.calibrate else None
    return EvalOutcome(summaries, stored)


async def _answer(
    settings: Settings,
    config: EvalConfig,
    samples: dict[str, list[Sample]],
    urls: Sequence[str],
    on_progress: Progress | None,
    on_notice: Notice | None,
) -> list[ModeSummary]:
    # Answers record abstentions by this run's threshold.
    settings = settings.model_copy(update={"abstain_below": config.abstain_below})
    in_processes = processes_for_modes(settings.processes, config.modes) > 1
    opening = _in_processes if in_processes else _in_this_process
    async with opening(settings, urls, on_notice) as answerers:
        return await _run(settings, config, samples, answerers, on_progress)


@asynccontextmanager
async def _in_this_process(
    settings: Settings, urls: Sequence[str], on_notice: Notice | None
) -> AsyncIterator[_Answerers]:
    """The agent opened here answers every mode."""
    from suwen.runtime import AgentAnswerer, ExampleVariants, open_agent

    async with open_agent(settings, urls, sessions=False, on_notice=on_notice) as agent:
        yield _Answerers(
            model=agent.model,
            calibration=agent.calibration,
            urls=getattr(agent.model, "urls", []),
            asking=lambda mode: AgentAnswerer(agent, mode),
            with_examples=ExampleVariants(agent),
        )


@asynccontextmanager
async def _in_processes(
    settings: Settings, urls: Sequence[str], on_notice: Notice | None
) -> AsyncIterator[_Answerers]:
    """The agent and adaptive modes answered by ``settings.processes`` agent processes
    (``suwen.answer_processes``) on the same servers; this process keeps the plain mode, the
    judge, the answer files and the report."""
    from suwen import privacy
    from suwen.agent.graph import calibration_for
    from suwen.answer_processes import ChildSpec, model_client, started
    from suwen.llm.server import served

    privacy.enforce()
    privacy.private_dir(settings.home)
    async with served(settings, urls) as (endpoints, name):
        spec = ChildSpec(settings=settings.model_dump(mode="json"), urls=endpoints, model=name)
        async with (
            started(spec, settings.processes, on_notice) as processes,
            model_client(settings, endpoints, name) as model,
        ):
            yield _Answerers(
                model=model,
                calibration=calibration_for(settings),
                urls=endpoints,
                asking=processes.asking,
                with_examples=processes.with_examples,
            )


@dataclass(frozen=True)
class _Answerers:
    """Who answers a run: the model (plain mode, the judge) and the agent in a mode."""

    model: VisionLanguageModel
    calibration: CalibrationFile | None
    urls: Sequence[str]
    asking: Callable[[Mode], Answerer]
    with_examples: ExampleAnswerers


async def _run(
    settings: Settings,
    config: EvalConfig,
    samples: dict[str, list[Sample]],
    answerers: _Answerers,
    on_progress: Progress | None,
) -> list[ModeSummary]:
    from suwen.evaluate.confidence_eval import plain_confidence_judge
    from suwen.evaluate.provenance import provenance

    model = answerers.model
    judge = plain_confidence_judge(model, answerers.calibration, config.abstain_below)
    wants_agent = any(answerer_of(mode) == "agent" for mode in config.modes)
    return await run_evaluation(
        config,
        samples,
        model=model,
        answerer=answerers.asking("agent") if wants_agent else None,
        on_progress=on_progress,
        adaptive=answerers.asking("adaptive") if "adaptive" in config.modes else None,
        plain_confidence=judge if settings.confidence else None,
        provenance=await provenance(settings.vlm, answerers.urls),
        with_examples=answerers.with_examples if config.case_examples else None,
    )


def store_calibration(settings: Settings, out: Path) -> StoredCalibration:
    """Fit the calibration maps the ``--calibrate`` run in ``out`` teaches (keeping an earlier
    file's maps it does not replace) and store them privately in the data home."""
    from suwen.evaluate.confidence_eval import fit_from_run

    fitted = fit_from_run(out, settings.vlm, load_calibration(settings.home))
    return StoredCalibration(fitted, save_calibration(settings.home, fitted))
