"""Train an AdvancedUNet2DModel on latents and write a LatentDDPMPipeline.

    accelerate launch train.py --train_data latents.npz --max_train_steps 20000
    python train.py --preset small --max_train_steps 1500      # built-in demo latents, CPU

Reads top to bottom: config -> accelerator -> run folder -> data -> model + EMA -> noise schedule
-> optimizer -> resume -> loop -> final pipeline, plots and quality figures. Flags: `--help`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext, suppress
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from latent_ddpm import AdvancedUNet2DModel, faults
from latent_ddpm.autoencoder import load_data_vae, read_encoding_info
from latent_ddpm.checkpoint_uploads import CheckpointUploader
from latent_ddpm.checkpointing import (
    generator_state,
    load_checkpoint,
    resolve_resume_once,
    save_checkpoint,
    set_generator_state,
)
from latent_ddpm.config import TrainConfig
from latent_ddpm.data import check_compatible
from latent_ddpm.diffusion import build_noise_scheduler, min_snr_weights, terminal_signal_warning, training_target
from latent_ddpm.errors import UserInputError, configure_logging, run_cli
from latent_ddpm.feeding import LatentFeeder, LatentStats, compute_stats, load_training_data
from latent_ddpm.flags import parse_train_args
from latent_ddpm.hub import check_hub_access, push_pipeline_to_hub
from latent_ddpm.paths import unwritable_folder
from latent_ddpm.reporting import (
    DivergenceWatch,
    build_pipeline,
    final_report,
    nonfinite_stop,
    preview_grid,
    push_checkpoint,
    record_epoch,
    schedule_error,
)
from latent_ddpm.resume import (
    apply_resumed_settings,
    check_resume_compatible,
    objective_settings,
    reseed_for_new_layout,
)
from latent_ddpm.run_folder import (
    RunLock,
    default_run_dir,
    prepare_run_folder,
    resumes_here,
    run_folder_conflict,
)
from latent_ddpm.unet import PRESETS, downsample_factor
from latent_ddpm.unet_config import size_advice

logger = logging.getLogger("latent_ddpm.train")


def main(argv: list[str] | None = None) -> int:
    cfg: TrainConfig = parse_train_args(argv)

    # 1. Accelerator: devices, processes, mixed precision, trackers.
    # A rank that dies leaves the others blocked in a collective: they give up after --ddp_timeout seconds
    # (torchrun's elastic agent usually tears them down sooner).
    # Trackers need a logging folder at construction; the real one (train/logs) is set once the run folder is known.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_config=ProjectConfiguration(logging_dir="."),
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))])
    configure_logging(accelerator.is_main_process)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("--mixed_precision fp16 has no autocast on CPU: this run trains in float32 (bf16 works)")
    if torch.cuda.is_available():  # both ways: torch's default leaves cuDNN convolutions (most of a UNet) in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    set_seed(cfg.seed, device_specific=False)  # same init on every rank

    # 2. Data: load and check (the normalisation statistics follow in step 3, once the model's needs are checked).
    data = load_training_data(cfg.train_data, latent_key=cfg.latent_key, label_key=cfg.label_key,
                              class_conditional=cfg.class_conditional, n_dim=cfg.n_dim, split=cfg.train_split,
                              subset=cfg.dataset_config_name)
    dataset, data_name, num_classes, class_ids = data.dataset, data.name, data.num_classes, data.class_ids
    channels, height, width = dataset.features["latents"].shape

    # 3. Model: preset + overrides, sized to the data; then the statistics (one streaming float64 pass).
    model_args = {**PRESETS[cfg.preset], **cfg.model_overrides()}
    with suppress(TypeError):  # first the data's size (a malformed down_sample: the model names it)
        down_sample = model_args.get("down_sample", ())
        origin = "--model_config" if "down_sample" in cfg.model_overrides() else f"--preset {cfg.preset}"
        check_compatible(dataset, downsample_factor=downsample_factor(down_sample), source=data.source,
                         fix=size_advice(down_sample, height, width, origin))
    try:
        unet = AdvancedUNet2DModel(**model_args, in_channels=channels, sample_size=[height, width],
                                   num_class_embeds=num_classes)
    except (TypeError, ValueError) as err:
        raise UserInputError(f"--preset/--model_config: {err}") from None
    stats: LatentStats = compute_stats(dataset, mode=cfg.normalization, scaling_factor=cfg.scaling_factor,
                                       source=data.source)
    # Latents made by `python -m latent_ddpm.encode` name their autoencoder: previews and the pipeline decode.
    encoding = read_encoding_info(cfg.train_data)
    vae = load_data_vae(encoding, cfg.train_data)
    vae = vae.to(accelerator.device) if vae is not None else None

    # 4. Noise schedule (diffusers DDPMScheduler), warning on a schedule that ends far from noise.
    noise_scheduler = build_noise_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start,
                                            cfg.beta_end, cfg.prediction_type)
    if msg := terminal_signal_warning(noise_scheduler):  # logged (stdout): stderr keeps only an error's one line
        logger.warning(msg)
    if msg := schedule_error(noise_scheduler, cfg, channels):  # refused before the run folder, not at the end
        raise UserInputError(msg)

    # 5. Steps and epochs.
    world = accelerator.num_processes
    feeder = LatentFeeder(dataset, cfg.train_batch_size, seed=cfg.seed, rank=accelerator.process_index,
                          world_size=world, device=accelerator.device, random_flip=cfg.random_flip,
                          in_memory=cfg.data_in_memory, num_workers=cfg.dataloader_num_workers)
    # The saved config holds what the run uses: the precision accelerate settled on, where the data lives.
    cfg.mixed_precision, cfg.data_in_memory = accelerator.mixed_precision, feeder.in_memory
    if len(feeder) < cfg.gradient_accumulation_steps:
        raise UserInputError(f"{data.source}: {len(dataset)} samples give {len(feeder)} batches of "
                             f"{cfg.train_batch_size} x {world} processes per epoch, fewer than "
                             f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}; lower the batch size")
    steps_per_epoch = len(feeder) // cfg.gradient_accumulation_steps
    max_steps = cfg.max_train_steps or steps_per_epoch * (cfg.num_epochs or 50)
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(
        data_name, channels, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    train_dir = run_dir / "train"
    n_params = sum(p.numel() for p in unet.parameters())
    plan = (f"{data_name}: {len(dataset)} latents of {channels}x{height}x{width}; {cfg.preset} UNet, "
            f"{n_params / 1e6:.2f}M parameters; {max_steps} steps = {num_epochs} epoch{'s' * (num_epochs != 1)} "
            f"of {steps_per_epoch} "
            f"(batch {cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x {world} processes), "
            f"peak learning rate {cfg.learning_rate:g}; run folder {run_dir}")
    hub_token = check_hub_access(cfg.hub_model_id, cfg.hub_token) if cfg.push_to_hub else None  # fail fast
    resume = resolve_resume_once(accelerator, train_dir, cfg.resume_from_checkpoint)
    # A resume continues the same run: the same model, data, objective and global batch (`check_resume_compatible`).
    run_settings = {"world_size": world, "train_batch_size": cfg.train_batch_size, "seed": cfg.seed,
                    "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                    "num_latents": len(dataset), "data_stats": stats.fingerprint(), "class_ids": class_ids,
                    **objective_settings(cfg)}
    new_layout = (check_resume_compatible(resume, dict(unet.config), run_settings, max_steps)
                  if resume is not None else None)
    if new_layout:
        logger.warning(new_layout)
    if cfg.dry_run:
        if conflict := run_folder_conflict(run_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir, resume,
                                           cfg.to_dict(), stats.to_dict()):
            raise UserInputError(conflict)
        if problem := unwritable_folder(run_dir):  # what step 6 would refuse
            raise UserInputError(f"--output_dir {run_dir}: {problem}; choose another --output_dir")
        if accelerator.is_main_process:
            print(f"dry run, nothing written: {plan}")
        return 0

    # 6. Run folder: never overwrite a previous run silently; lock it against a second run. The main process
    #    decides and every process gets its verdict, so no rank is left waiting on another's error.
    lock = RunLock(run_dir)
    files = {"config.json": json.dumps(cfg.to_dict(), indent=2),  # the resolved config, beside the run
             "latent_stats.json": json.dumps(stats.to_dict(), indent=2)}
    error = (prepare_run_folder(run_dir, lock, cfg.resume_from_checkpoint, resume, cfg.overwrite_output_dir, files)
             if accelerator.is_main_process else None)
    if (error := broadcast_object_list([error])[0]) is not None:
        raise UserInputError(error)
    if cfg.resume_from_checkpoint == "latest" and resume is None:
        logger.info("no complete checkpoint in %s: starting from scratch", train_dir)
    if cfg.overwrite_output_dir and resumes_here(run_dir, resume):
        logger.warning("--overwrite_output_dir ignored: resuming %s keeps the run (drop --resume_from_checkpoint to "
                       "start over)", resume)

    # 7. Model memory format, EMA, optimizer, LR schedule.
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unet = unet.to(accelerator.device, memory_format=memory_format)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power,
                       model_cls=AdvancedUNet2DModel, model_config=unet.config, foreach=True)
        ema.to(accelerator.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                  foreach=accelerator.device.type != "cuda" or None,
                                  fused=accelerator.device.type == "cuda" or None)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    # `model` is what runs (compiled, DDP-wrapped); `unet` stays the plain module that shares its parameters.
    model = torch.compile(unet) if cfg.compile else unet
    model, optimizer = accelerator.prepare(model, optimizer)
    if world > 1:  # the weights were drawn alike on every rank (step 1); dropout draws a stream per rank
        set_seed(cfg.seed, device_specific=True)
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1000 + accelerator.process_index)

    # 8. Resume: weights, optimizer, RNG, EMA, LR schedule, data position and history.
    global_step, history = 0, {"steps": [], "losses": [], "epoch_ends": [], "epoch_means": [], "skipped": 0}
    if resume is not None:
        state = load_checkpoint(accelerator, resume, ema)
        global_step, history = state["global_step"], state["history"]
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if new_layout:  # another number of processes or batch size: new random streams
            reseed_for_new_layout(noise_gen, cfg.seed, global_step, accelerator.process_index)
        else:
            set_generator_state(noise_gen, state["noise_generator"][accelerator.process_index])
        logger.info("resumed from %s at step %d", resume, global_step)
        if changed := apply_resumed_settings(optimizer, lr_scheduler, ema, cfg):
            logger.info("resumed with this run's settings, not the checkpoint's: %s", "; ".join(changed))
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.project_configuration.logging_dir = str(train_dir / "logs")  # now that the run folder is known
        accelerator.init_trackers("latent_ddpm", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    logger.info(plan)

    def epoch_preview(done: int) -> None:  # the main process's grid after epoch `done`, when one is due
        if (accelerator.is_main_process and cfg.save_images_epochs and done % cfg.save_images_epochs == 0
                and global_step < max_steps):
            preview_grid(build_pipeline(unet, ema, noise_scheduler, stats, vae, class_ids), cfg,
                         train_dir / f"samples_epoch_{done}.png")

    if resume is not None and global_step % steps_per_epoch == 0:  # a crash may have come between the epoch's
        epoch_preview(global_step // steps_per_epoch)  # last checkpoint and its preview

    # 9. Train. One optimizer step = gradient_accumulation_steps micro-batches (leftover micro-batches at
    #    an epoch's end are skipped). The loss stays on the device and is read back every logging_steps (and at
    #    epoch ends and checkpoints); only the finite-check flag crosses to the host each step.
    progress = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    pending: list[torch.Tensor] = []  # per-step losses still on the device
    window: list[float] = []  # read back, not yet logged
    nonfinite_in_a_row, t_last, samples_since = 0, time.perf_counter(), 0
    last_checkpoint: Path | None = None  # the one written at max_steps
    uploader = (CheckpointUploader(cfg.hub_model_id, private=cfg.hub_private_repo, token=hub_token)
                if cfg.push_to_hub and cfg.push_checkpoints and accelerator.is_main_process else None)
    divergence = DivergenceWatch(cfg.lr_warmup_steps)
    accumulation = cfg.gradient_accumulation_steps
    epoch = global_step // steps_per_epoch
    while global_step < max_steps:
        first = global_step % steps_per_epoch
        batches = feeder.epoch_batches(epoch, start_batch=first * accumulation)
        model.train()
        for _ in range(first, steps_per_epoch):
            faults.die_at(accelerator.process_index, global_step + 1)
            step_loss = torch.zeros((), device=accelerator.device)
            for i in range(accumulation):
                x0, labels = next(batches)
                x0 = stats.normalize(x0).contiguous(memory_format=memory_format)
                noise = torch.randn(x0.shape, generator=noise_gen, device=x0.device).contiguous(
                    memory_format=memory_format)
                t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=noise_gen, device=x0.device)
                if num_classes:  # label dropout trains the "no class" embedding (classifier-free guidance)
                    drop = torch.rand(x0.shape[0], generator=noise_gen, device=x0.device) < cfg.cond_drop_prob
                    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
                x_t = noise_scheduler.add_noise(x0, noise, t)  # q(x_t | x_0), Ho et al. 2020 eq. 4
                sync = nullcontext() if i == accumulation - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        pred = model(x_t, t, class_labels=labels if num_classes else None).sample
                    err = ((pred.float() - training_target(noise_scheduler, x0, noise, t).float()) ** 2)
                    err = err.mean(dim=(1, 2, 3))
                    weights = min_snr_weights(noise_scheduler, t, cfg.snr_gamma, cfg.snr_floor)
                    loss = (err * weights).mean() if weights is not None else err.mean()
                    accelerator.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            mean_loss = accelerator.reduce(step_loss, reduction="mean")
            finite = torch.isfinite(mean_loss)
            if accelerator.mixed_precision != "fp16":  # fp16 overflows are the grad scaler's business
                finite &= torch.isfinite(grad_norm)
            if bool(finite):  # the one host sync per step; identical on every rank
                optimizer.step()
                if ema is not None and not accelerator.optimizer_step_was_skipped:
                    ema.step(unet.parameters())
                nonfinite_in_a_row = 0
            else:  # skip: parameters, optimizer state and EMA stay untouched
                if accelerator.scaler is not None:  # fp16: the gradients were unscaled; let the scaler back off
                    accelerator.scaler.update()
                history["skipped"] += 1
                nonfinite_in_a_row += 1
                logger.warning("non-finite loss at step %d: skipped (%d in a row)", global_step + 1,
                               nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise nonfinite_stop(nonfinite_in_a_row, global_step + 1, train_dir, resume)
            optimizer.zero_grad(set_to_none=True)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used (logged), before the schedule moves
            lr_scheduler.step()
            global_step += 1
            samples_since += cfg.train_batch_size * accumulation * world
            pending.append(mean_loss)
            progress.update(1)

            # The losses reach the host only to be logged, at an epoch's end and in a checkpoint's history (so a
            # resumed run's loss curve and epoch means are the uninterrupted run's).
            log_now = global_step % cfg.logging_steps == 0 or global_step == max_steps
            epoch_done = global_step % steps_per_epoch == 0
            # No periodic checkpoint inside a non-finite streak: the last one before it stays the newest.
            save_now = (global_step == max_steps
                        or global_step % cfg.checkpointing_steps == 0 and not nonfinite_in_a_row)
            if pending and (log_now or epoch_done or save_now):
                values = torch.stack(pending).tolist()
                history["steps"] += list(range(global_step - len(values) + 1, global_step + 1))
                history["losses"] += values
                window += values
                pending.clear()
            if epoch_done:
                record_epoch(history, global_step, steps_per_epoch)

            if log_now:
                now = time.perf_counter()
                logs = {"loss": sum(window) / len(window), "lr": step_lr,
                        "samples_per_s": samples_since / (now - t_last), "skipped": history["skipped"]}
                t_last, samples_since, window = now, 0, []
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                     sps=f"{logs['samples_per_s']:.1f}")
                if not sys.stderr.isatty():
                    logger.info("step %d/%d %s", global_step, max_steps,
                                " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                accelerator.log(logs, step=global_step)
                if (warning := divergence.update(global_step, history["losses"])) and accelerator.is_main_process:
                    logger.warning(warning)

            if save_now:
                state = {"global_step": global_step, "epoch": epoch, "history": history, "run_settings": run_settings,
                         "model_config": dict(unet.config), "lr_scheduler": lr_scheduler.state_dict(),
                         "noise_generator": gather_object([generator_state(noise_gen)])}  # every rank's, in order
                ckpt = save_checkpoint(accelerator, train_dir, global_step, state, ema, cfg.checkpoints_total_limit)
                if global_step == max_steps:  # uploaded (with --push_checkpoints) after the ranks part, in 11.
                    last_checkpoint = ckpt
                elif uploader is not None:  # uploaded in the background while training goes on
                    push_checkpoint(build_pipeline(unet, ema, noise_scheduler, stats, vae, class_ids), ckpt,
                                    uploader)
            if global_step >= max_steps:
                break

        if global_step % steps_per_epoch == 0:  # the epoch is complete
            epoch += 1
            epoch_preview(epoch)
    progress.close()

    # 10. The ranks part. DDP keeps their weights identical; the checksums check it (an error is logged if they
    #     differ). Nothing after this needs the other ranks, so they finish here, instead of waiting under
    #     --ddp_timeout for the main process's report and upload (a big model or a slow link can take longer).
    checksums = gather_object([sum(float(p.detach().double().sum()) for p in unet.parameters())])
    accelerator.wait_for_everyone()
    # DDP's reducer must not be the last owner of the process group when it goes: gloo's teardown from there
    # waits for its worker threads while holding the GIL that they may need (pytorch/pytorch#56297; seen as a
    # rare hang at the end of 2-process CPU runs). Dropped first, the group goes in end_training, GIL released.
    del model
    accelerator.free_memory()
    accelerator.end_training()  # trackers finished, process group destroyed: no collective from here on
    faults.rank_ended(accelerator.is_main_process)

    # 11. The final pipeline (EMA weights), loss curve, preview grid and quality figures; the upload.
    if accelerator.is_main_process:
        faults.hold_report()
        history["rank_weight_checksums"] = checksums
        if len(set(checksums)) > 1:
            logger.error("the ranks' weights differ at the end (checksums %s): DDP did not keep them in sync; "
                         "the saved pipeline holds rank 0's", checksums)
        pipe = build_pipeline(unet, ema, noise_scheduler, stats, vae, class_ids)
        final_report(pipe, cfg, dataset, run_dir, history, plan)
        if uploader is not None:  # the last checkpoint, then every checkpoint upload has finished
            if last_checkpoint is not None:
                push_checkpoint(pipe, last_checkpoint, uploader)
            uploader.wait()
        if cfg.push_to_hub:
            url = push_pipeline_to_hub(run_dir / "pipeline", cfg.hub_model_id, private=cfg.hub_private_repo,
                                       token=hub_token, train_dir=train_dir)
            logger.info("pushed the pipeline to %s", url)
    lock.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
