"""Notifications and user hooks: SimpleTuner's `webhook_config`, `post_checkpoint_script`, `post_upload_script` and
`validation_method = "external-script"`.

What a stage calls (nothing here raises at run time except ConfigError while setting up; a dead webhook endpoint or a
failing script is logged and never slows or stops the stage)::

    from pipeline import notify

    notify.check_hooks(config)                        # at start-up: ConfigError for unusable script options
    notifier = notify.Notifier.from_config(config, loaded.base_dir, stage="train",
                                           main_process=is_main)   # ConfigError for a bad webhook_config
    try:
        notifier.start({"run": run_name, "max_train_steps": total})
        ...  notifier.progress(step, total, {"loss": loss, "lr": lr})   # throttled: webhook_reporting_interval
        ...  notifier.validation(step, image_paths, prompts)
        ...  notifier.checkpoint(step, path); notify.post_checkpoint(config, step, path)  # background, bounded
        ...  notify.post_upload(config, step, path, remote_url)       # after a hub/S3 upload
        ...  if config.validation_method == "external-script":
                 notify.external_validation(config, step, checkpoint_path)  # background per config
        notifier.finished({"global_step": step})
    except Exception as exc:
        notifier.error(str(exc)); raise
    finally:
        notifier.close(timeout=5)
        notify.wait_for_hooks()                       # background hooks end (or are killed) before the stage

Webhook events (JSON for raw targets) carry `job_id` (ST_JOB_ID, else SIMPLETUNER_JOB_ID), `stage`, `event` (also as
SimpleTuner's `message_type`), `level`, `timestamp` (ISO 8601, UTC), `message`, and the event's fields (`step`,
`total`, `metrics`, `path`, `image_paths`, `prompts`, `images` [base64], `summary`, `error`, `info`). Levels and which
target receives what: see `pipeline.notify.webhooks`. Placeholders of the scripts: see `pipeline.notify.hooks`.
"""

from .hooks import (
    check_hooks,
    checkpoint_placeholders,
    external_validation,
    post_checkpoint,
    post_upload,
    run_hook,
    validation_placeholders,
    wait_for_hooks,
)
from .webhooks import LEVELS, Notifier, Target, job_id_from_env, parse_webhook_config

__all__ = [
    "LEVELS",
    "Notifier",
    "Target",
    "check_hooks",
    "checkpoint_placeholders",
    "external_validation",
    "job_id_from_env",
    "parse_webhook_config",
    "post_checkpoint",
    "post_upload",
    "run_hook",
    "validation_placeholders",
    "wait_for_hooks",
]
