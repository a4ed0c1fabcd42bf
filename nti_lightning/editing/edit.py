"""`edit`: sampling an inverted image with other prompts, under Prompt-to-Prompt control or not.

The source and edit prompts run as one batch from the same `z_T`, with the inversion's null
embedding of step i as the unconditional input of every prompt at step i, through the same
sampler as the reconstruction (`nti_lightning.inversion.sampling.sample`). Without a controller
(and without an attention store) nothing is hooked, so editing with the source prompt alone is
exactly `nti_lightning.reconstruct`.

One edit or many (`edit_jobs_latents`), the batch's rows are edited by one editor
(`nti_lightning.editing.editor`), the first of `EDITORS` that takes them: Prompt-to-Prompt's
`BatchedControl` for built-in controllers, MasaCtrl, Plug-and-Play or Pix2Pix-Zero for jobs with
their settings (`editor=`), else `_SplitHook`, each controller's own calls on its rows (a user's
subclass). Jobs of different editors are sampled in batches of their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from nti_lightning.data.images import to_pil
from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.editing.attention import (
    AttentionHook,
    AttentionLayer,
    AttentionStore,
)
from nti_lightning.editing.batched_control import BatchedControl
from nti_lightning.editing.controllers import AttentionController
from nti_lightning.editing.editor import Editor, EditorSettings, EditRows, SamplingInputs, editor_for, then
from nti_lightning.editing.editors import editor_settings
from nti_lightning.editing.masactrl import MasaCtrlEditor
from nti_lightning.editing.pix2pix_zero import Pix2PixZeroEditor
from nti_lightning.editing.plug_and_play import PlugAndPlayEditor
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.inversion.methods import method_of, source_branch_hook
from nti_lightning.inversion.pivot import ddim_invert
from nti_lightning.inversion.sampling import SamplingRule, StepCallback, combined_rule, sample
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.pipelines import Pipeline, is_sdxl
from nti_lightning.models.text import PromptEncoder

log = logging.getLogger(__name__)


def edit(
    pipeline: Pipeline,
    inversion: Inversion,
    prompts: Union[str, Sequence[str]],
    *,
    controller: Optional[AttentionController] = None,
    guidance_scale: float = 7.5,
    attention_store: Optional[AttentionStore] = None,
    allow_model_mismatch: bool = False,
    editor: Union[str, EditorSettings, None] = None,
) -> list[Image.Image]:
    """Edits an inverted image: one image per prompt, sampled together from the inversion's `z_T`.

    Args:
        pipeline (`Pipeline`): the pipeline the inversion was made with.
        inversion (`Inversion`): the result of `invert` (or `Inversion.load`).
        prompts (`str` or sequence of `str`): with a controller, the controller's prompts, the
            first being the inversion's source prompt; without one, any prompts (a plain prompt
            swap; the source prompt alone reconstructs the image exactly as `reconstruct`).
        controller (`AttentionController`, *optional*): `Replace`, `Refine` or `Reweight`.
        guidance_scale (`float`, defaults to 7.5): w; the inversion's own w reconstructs best.
        attention_store (`AttentionStore`, *optional*): records the cross-attention maps of the
            run (for `cross_attention_picture`); emptied first.
        allow_model_mismatch (`bool`, defaults to False): edit an inversion made with other weights
            than the pipeline's (refused otherwise: see `check_compatible`).
        editor (`str` or `EditorSettings`, *optional*): another editor than Prompt-to-Prompt:
            "masactrl", "pnp" or "p2p_zero" with their default settings, or their settings
            (`MasaCtrl(start_step=4, start_layer=10)`, `PlugAndPlay(...)`, `Pix2PixZero(...)`);
            the prompts are then the source prompt and the targets, and `controller` is not given.

    Returns:
        One `PIL.Image` per prompt, in order (index 0 is the source prompt's when a controller is used).

    Raises:
        `ValueError` when the inversion does not fit the pipeline, or the prompts the controller.
    """
    latents = edit_latents(
        pipeline,
        inversion,
        prompts,
        controller=controller,
        guidance_scale=guidance_scale,
        attention_store=attention_store,
        allow_model_mismatch=allow_model_mismatch,
        editor=editor,
    )
    return [to_pil(image) for image in vae_codec.decode(pipeline.vae, latents)]


@torch.no_grad()
def edit_latents(
    pipeline: Pipeline,
    inversion: Inversion,
    prompts: Union[str, Sequence[str]],
    *,
    controller: Optional[AttentionController] = None,
    guidance_scale: float = 7.5,
    attention_store: Optional[AttentionStore] = None,
    allow_model_mismatch: bool = False,
    editor: Union[str, EditorSettings, None] = None,
) -> torch.Tensor:
    """`[P, C, h, w]` latents at t = 0 of `edit` (same arguments), before decoding."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    settings = editor_settings(editor) if isinstance(editor, str) else editor
    job = EditJob(inversion, prompts, controller, attention_store, settings)
    [latents] = edit_jobs_latents(pipeline, [job], guidance_scale, allow_model_mismatch=allow_model_mismatch)
    return latents


@dataclass
class EditJob:
    """One inversion's edit in a batch of edits (see `edit_jobs_latents`).

    Args:
        inversion (`Inversion`): the inverted image.
        prompts (`list[str]`): its prompts (with a controller: the controller's, source first).
        controller (`AttentionController`, *optional*): its Prompt-to-Prompt controller.
        attention_store (`AttentionStore`, *optional*): records its cross-attention maps.
        editor (`EditorSettings`, *optional*): its settings for another editor (MasaCtrl,
            Plug-and-Play, Pix2Pix-Zero), instead of a controller.
    """

    inversion: Inversion
    prompts: list[str]
    controller: Optional[AttentionController] = None
    attention_store: Optional[AttentionStore] = None
    editor: Optional[EditorSettings] = None

    @property
    def settings(self) -> Any:
        """What its editor reads: the controller or the other editor's settings (None for neither)."""
        return self.controller if self.controller is not None else self.editor


def edit_jobs_latents(
    pipeline: Pipeline,
    jobs: Sequence[EditJob],
    guidance_scale: float = 7.5,
    allow_model_mismatch: bool = False,
) -> list[torch.Tensor]:
    """Several edits sampled together: every job's rows in each UNet call, each job with its own
    `z_T`, per-step nulls, controller, attention store and LocalBlend state. Each job's `[P, C, h, w]`
    latents equal those of its edit alone up to the float rounding of a larger batch. One editor
    (`EDITORS`) edits all rows; each job's inversion method adds its source-branch hook after it.

    Args:
        pipeline (`Pipeline`): the pipeline the inversions were made with.
        jobs (`Sequence[EditJob]`): the edits; all with the same T.
        guidance_scale (`float`, defaults to 7.5): w.
        allow_model_mismatch (`bool`, defaults to False): see `edit`.
    """
    if not jobs:
        return []
    steps = {job.inversion.num_inference_steps for job in jobs}
    if len(steps) > 1:
        raise ValueError(f"edits sampled together need one number of steps, got {sorted(steps)}")
    for job in jobs:
        _check_job(pipeline, job, allow_model_mismatch)
    schedule = DDIMSchedule.from_scheduler_config(pipeline.scheduler.config, steps.pop())
    # Jobs whose methods start at the same step with the same kind of step, and whose edits one
    # editor makes, share each UNet call; the others (edit-friendly DDPM's skip, another editor)
    # are sampled after them, in their own calls.
    rules: list[SamplingRule] = []
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, job in enumerate(jobs):
        method = method_of(job.inversion)
        if not method.edits_under_control and job.settings is not None:
            raise ValueError(
                f"an {method.label} inversion is edited as its authors' code edits it, without an editor's "
                "control: use the prompts alone (kind \"swap\" in an edit spec)"
            )
        rules.append(method.sampling_rule(job.inversion, job.prompts, guidance_scale))
        if job.editor is not None:
            job.editor.check_edit(job.prompts, is_sdxl(pipeline), rules[-1], method.label)
        editor_kind = type(job.editor).__name__ if job.editor is not None else "p2p"
        groups.setdefault((*rules[-1].kind, editor_kind), []).append(k)
    results: list[Optional[torch.Tensor]] = [None] * len(jobs)
    for members in groups.values():
        latents = _sample_jobs(
            pipeline, schedule, [jobs[k] for k in members], [rules[k] for k in members], guidance_scale
        )
        for k, latent in zip(members, latents):
            results[k] = latent
    return [latent for latent in results if latent is not None]


def _sample_jobs(
    pipeline: Pipeline,
    schedule: DDIMSchedule,
    jobs: Sequence[EditJob],
    rules: Sequence[SamplingRule],
    guidance_scale: float,
) -> list[torch.Tensor]:
    """`edit_jobs_latents` for jobs whose rules share their start step and step kind."""
    unet = pipeline.unet
    sizes = [len(job.prompts) for job in jobs]
    cond, z_T, nulls = _batch(pipeline, jobs, sizes)
    rule = combined_rule(rules, sizes, guidance_scale)

    stores: list[Optional[AttentionStore]] = []
    for job in jobs:
        store = job.attention_store
        if job.controller is not None:
            store = store if store is not None else job.controller.new_store()
            job.controller.begin(schedule.num_inference_steps, store)  # resets the store
        elif store is not None:
            store.reset()
        stores.append(store)
    # Each job's source-branch hook (Direct Inversion's offsets on its source rows, or nothing),
    # after the editor's own end of step.
    source_branches = _split_steps([source_branch_hook(job.inversion, job.prompts, None) for job in jobs], sizes)
    if all(job.settings is None and store is None for job, store in zip(jobs, stores)):
        # Nothing to hook: with the source prompt alone, exactly `reconstruct`.
        latents = sample(unet, schedule, z_T, nulls, cond, guidance_scale, on_step=source_branches, rule=rule)
        return list(latents.split(sizes))
    rows = EditRows(sizes, [job.settings for job in jobs], stores, schedule.num_inference_steps)
    editor = editor_for(rows, EDITORS)
    encoder = PromptEncoder.of(pipeline)
    inputs = SamplingInputs(
        unet=unet,
        schedule=schedule,
        z_T=z_T.expand(cond.batch, -1, -1, -1),
        nulls=nulls,
        cond=cond,
        guidance_scale=guidance_scale,
        rule=rule,
        after=source_branches,
        encode=lambda prompts: encoder.encode(prompts).to(unet.device),
        source_trajectory=lambda scales: source_trajectories(pipeline, schedule, jobs, scales),
        follows_pivot=[method_of(job.inversion).retraces_pivot for job in jobs],
    )
    latents = editor.sample(inputs)
    return list(latents.split(sizes))


def _batch(
    pipeline: Pipeline, jobs: Sequence[EditJob], sizes: Sequence[int]
) -> tuple[Condition, torch.Tensor, list[Condition]]:
    """The prompt conditions, starting latents and per-step nulls of the jobs' rows (`sizes[k]`
    rows of job k: its prompts)."""
    device = pipeline.unet.device
    cond = PromptEncoder.of(pipeline).encode([prompt for job in jobs for prompt in job.prompts]).to(device)
    if cond.has_pooled:  # the micro-conditioning each image was inverted with
        time_ids = torch.cat([_time_ids(job.inversion, size) for job, size in zip(jobs, sizes)])
        cond = Condition(cond.embeddings, cond.pooled, time_ids.to(device))
    z_T = torch.cat([job.inversion.z_T.unsqueeze(0).expand(size, -1, -1, -1) for job, size in zip(jobs, sizes)]).to(
        device
    )
    return cond, z_T, _batched_nulls(jobs, sizes, cond)


@torch.no_grad()
def source_trajectories(
    pipeline: Pipeline, schedule: DDIMSchedule, jobs: Sequence[EditJob], guidance_scales: torch.Tensor
) -> torch.Tensor:
    """`[T + 1, jobs, C, h, w]`: the latents of each job's source branch, its starting latent first.
    For an inversion that keeps its trajectory (`pivot_latents`: ProxNPI's, Pix2Pix-Zero's) that
    trajectory; for one that follows its pivot (Direct Inversion: its offsets put the source row back
    on it) the pivot itself, the DDIM inversion of its source latent (T UNet rows, recomputed: the
    source row sampled with the offsets drifts from it at float rounding amplified by each guided
    step); otherwise its source prompt sampled alone from its `z_T` as its method reconstructs it
    (its nulls) at its own w: the plain DDIM reconstruction at w = 1 for a DDIM inversion. Every
    job's method must sample by plain DDIM steps.

    Args:
        pipeline (`Pipeline`): the pipeline.
        schedule (`DDIMSchedule`): the schedule (T steps).
        jobs (`Sequence[EditJob]`): the edits, their inversions' source prompts sampled.
        guidance_scales (`torch.Tensor`): `[jobs]` w of each (for the sampled ones).
    """
    plain = [EditJob(job.inversion, [job.inversion.prompt]) for job in jobs]
    sizes = [1] * len(plain)
    cond, z_T, nulls = _batch(pipeline, plain, sizes)
    rules = [method_of(job.inversion).sampling_rule(job.inversion, job.prompts, 1.0) for job in plain]
    if not all(rule.is_plain for rule in rules):
        raise ValueError("a source trajectory is sampled for inversions of methods with plain DDIM steps only")
    stored = [k for k, job in enumerate(plain) if job.inversion.pivot_latents is not None]
    pivots = [k for k, job in enumerate(plain) if method_of(job.inversion).retraces_pivot and k not in stored]
    sampled = [k for k in range(len(plain)) if k not in pivots and k not in stored]
    trajectory = torch.empty(schedule.num_inference_steps + 1, *z_T.shape, device=z_T.device)
    for k in stored:  # the trajectory the artifact keeps: z_T, then the latent each step lands on
        trajectory[0, k] = z_T[k]
        trajectory[1:, k] = plain[k].inversion.pivot_latents.to(z_T.device)
    if pivots:
        z0 = torch.stack([plain[k].inversion.source_latent for k in pivots]).to(z_T.device)
        index = torch.tensor(pivots, device=z_T.device)
        trajectory[:, index] = ddim_invert(pipeline.unet, schedule, z0, cond.rows(index)).latents.flip(0)
    if sampled:
        index = torch.tensor(sampled, device=z_T.device)
        recorded = [z_T[index].float()]

        def record(step: int, timestep: int, latents: torch.Tensor) -> None:
            recorded.append(latents)

        rule = SamplingRule(guidance_scales=guidance_scales[index.cpu()].float())
        step_nulls = [null if null.batch == 1 else null.rows(index) for null in nulls]
        sample(pipeline.unet, schedule, z_T[index], step_nulls, cond.rows(index), 1.0, on_step=record, rule=rule)
        trajectory[:, index] = torch.stack(recorded)
    return trajectory


def _check_job(pipeline: Pipeline, job: EditJob, allow_model_mismatch: bool) -> None:
    """Raises `ValueError` naming the problem of a job's prompts, controller or inversion."""
    prompts, controller, inversion = job.prompts, job.controller, job.inversion
    if not prompts:
        raise ValueError("edit needs at least one prompt")
    check_compatible(pipeline, inversion, allow_model_mismatch=allow_model_mismatch)
    if controller is not None and job.editor is not None:
        raise ValueError(
            f"an edit is made by one editor: a Prompt-to-Prompt controller or {job.editor.label}'s settings, not both"
        )
    if job.editor is not None and prompts[0] != inversion.prompt:
        raise ValueError(
            f"the first prompt {prompts[0]!r} must be the inversion's source prompt {inversion.prompt!r}: "
            f"{job.editor.label} takes the source branch from it"
        )
    if controller is not None:
        if prompts != controller.prompts:
            raise ValueError(f"the controller was built for prompts {controller.prompts}, but edit got {prompts}")
        if prompts[0] != inversion.prompt:
            raise ValueError(
                f"the first prompt {prompts[0]!r} must be the inversion's source prompt {inversion.prompt!r}: "
                "Prompt-to-Prompt takes the edits' attention from the source"
            )


def _batched_nulls(jobs: Sequence[EditJob], sizes: Sequence[int], cond: Condition) -> list[Condition]:
    """Per step, the null condition of every row: a job's null broadcast to its prompts (one row
    for a single job, which the sampler broadcasts itself)."""
    per_job = [null_conditions(job.inversion, cond) for job in jobs]
    if len(jobs) == 1:
        return per_job[0]
    time_ids = cond.time_ids
    return [
        Condition(
            torch.cat([nulls[step].embeddings.expand(size, -1, -1) for nulls, size in zip(per_job, sizes)]),
            None
            if time_ids is None
            else torch.cat([nulls[step].pooled.expand(size, -1) for nulls, size in zip(per_job, sizes)]),
            time_ids,
        )
        for step in range(len(per_job[0]))
    ]


def _store_stepper(store: AttentionStore) -> StepCallback:
    """A step hook that counts `store`'s steps."""

    def on_step(step: int, timestep: int, latents: torch.Tensor) -> None:
        store.end_step()

    return on_step


def _split_steps(steppers: Sequence[Optional[StepCallback]], sizes: Sequence[int]) -> Optional[StepCallback]:
    """One step hook for the batch: each job's hook on its own rows (None when no job has one)."""
    if all(stepper is None for stepper in steppers):
        return None

    def on_step(step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        parts = []
        for stepper, part in zip(steppers, latents.split(list(sizes))):
            replaced = stepper(step, timestep, part) if stepper is not None else None
            parts.append(part if replaced is None else replaced)
        return torch.cat(parts)

    return on_step


class _SplitHook(Editor):
    """The per-controller path, for a batch that `BatchedControl` leaves: each job's controller
    (of a user's own kind: its own `__call__`, `end_step`, `replace_cross`, blend or store) or
    attention store called on its own rows of the conditional maps and latents; rows of jobs
    without one pass untouched. Build it with `_SplitHook.of`.

    Args:
        rows (`EditRows`): the batch's rows; each job's settings an `AttentionController` (begun) or None.
    """

    def __init__(self, rows: EditRows) -> None:
        self.sizes = list(rows.sizes)
        self.hooks: list[Optional[AttentionHook]] = []
        self.steppers: list[Optional[StepCallback]] = []
        for controller, store in zip(rows.settings, rows.stores):
            if controller is not None:
                self.hooks.append(controller)
                self.steppers.append(controller.end_step)
            else:
                self.hooks.append(store)
                self.steppers.append(_store_stepper(store) if store is not None else None)

    @classmethod
    def of(cls, rows: EditRows) -> Optional["_SplitHook"]:
        """The per-controller calls of `rows`, or None when a job's settings are no controller.

        Args:
            rows (`EditRows`): the batch's rows.
        """
        if any(settings is not None and not isinstance(settings, AttentionController) for settings in rows.settings):
            return None
        return cls(rows)

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """Each job's hook on its rows of `[rows, heads, queries, keys]` maps.

        Args:
            probs (`torch.Tensor`): the maps of every row of the batch.
            layer (`AttentionLayer`): where the call happens.
        """
        if len(self.hooks) == 1:
            return self.hooks[0](probs, layer)
        jobs = probs.split(self.sizes)
        parts = [hook(part, layer) if hook is not None else part for hook, part in zip(self.hooks, jobs)]
        return torch.cat(parts)

    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        """Each job's `end_step` (or its store's step) on its rows, then `after`.

        Args:
            after (`StepCallback`, *optional*): run next (the source-branch hooks).
        """
        own = _split_steps(self.steppers, self.sizes)
        assert own is not None  # a job of this batch has a controller or a store
        return then(own, after) or own


#: The editors a batch of edits is offered to, in order: the first whose `of` takes the batch's
#: rows edits it (`editor_for`). A new editor is one module with an `Editor` subclass, added here
#: before `_SplitHook`, which takes whatever batch of controllers the others leave.
EDITORS: tuple[type[Editor], ...] = (BatchedControl, MasaCtrlEditor, PlugAndPlayEditor, Pix2PixZeroEditor, _SplitHook)


def null_conditions(inversion: Inversion, cond: Condition) -> list[Condition]:
    """The inversion's T per-step null conditions, one row each (broadcast to every prompt), on
    `cond`'s device and with its time ids."""
    device = cond.embeddings.device
    embeddings = inversion.null_embeddings.to(device)
    pooled = inversion.null_pooled_embeddings.to(device) if inversion.null_pooled_embeddings is not None else None
    time_ids = cond.time_ids[:1] if cond.time_ids is not None else None
    return [
        Condition(embeddings[step : step + 1], None if pooled is None else pooled[step : step + 1], time_ids)
        for step in range(embeddings.shape[0])
    ]


def _time_ids(inversion: Inversion, rows: int) -> torch.Tensor:
    """`[rows, 6]` time ids recorded in an SDXL inversion."""
    return torch.tensor([inversion.metadata["time_ids"]], dtype=torch.float32).expand(rows, -1).clone()
