"""What `jobs validate` and `jobs get` print for a person (the --json documents are checked
against a real stack in test_readme_session.py): every figure of the plan, the schedule drawn,
guesses marked, a failed job's reason with what to do."""

from __future__ import annotations

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.cli.jobs import job_summary, lr_plot, print_plan


def plan() -> js.ValidateJobResponse:
    r = js.ValidateJobResponse(warnings=["learning rate above 1e-3 may make training unstable"])
    d = r.dataset_plan
    d.workspace_examples, d.after_topics, d.after_formats, d.after_dedupe = 500, 250, 240, 238
    d.overlength, d.after_overlength, d.train_count, d.test_count = 3, 235, 212, 23
    d.train_tokens, d.test_tokens, d.tokenizer = 123_456, 14_000, "llama-3.1-8b"
    t = r.training_plan
    t.steps_per_epoch, t.epochs, t.total_steps, t.total_training_tokens = 27, 2, 54, 246_912
    t.eval_steps.extend([14, 27, 41, 54])
    t.checkpoint_steps.extend([27, 54])
    for step, lr in ((1, 1e-5), (6, 1e-4), (7, 1e-4), (30, 5e-5), (54, 1e-5)):
        t.learning_rate_schedule.add(step=step, learning_rate=lr)
    t.wall_time_estimates.add(device_class="cpu", seconds=5400, tokens_per_second=45.7, guess=True,
                              basis="no run measured; 6 x parameters FLOPs per token at 5e10 FLOP/s", workers=1)
    t.wall_time_estimates.add(device_class="cuda:NVIDIA H100", seconds=30, tokens_per_second=8230, guess=False,
                              basis="median of 3 measured runs of llama-3.1-8b on cuda:NVIDIA H100", workers=2)
    r.resolved_hyperparameters.learning_rate = 1e-4
    r.resolved_hyperparameters.lora_target_modules.extend(["q_proj", "v_proj"])
    return r


def test_validate_prints_every_figure(capsys):
    print_plan("acme", "llama-3.1-8b", "sft", plan())
    out = capsys.readouterr().out
    for expected in ("examples in the workspace   500", "with the job's topics       250",
                     "of the method's formats     240", "after removing duplicates   238",
                     "over the context length     3", "kept                        235",
                     "split                       212 train / 23 test", "123.5k train, 14.0k test (llama-3.1-8b tokenizer)",
                     "27 per epoch × 2 epochs = 54", "evaluations after steps     14, 27, 41, 54",
                     "checkpoints at steps        27, 54", "training tokens             246.9k",
                     "~1.5 h at 46 tokens/s, 1 worker — GUESS: no run measured",
                     "time on cuda:NVIDIA H100    30 s at 8,230 tokens/s, 2 workers — median of 3 measured",
                     "learning_rate=0.0001", "lora_target_modules=q_proj,v_proj",
                     "warning: learning rate above 1e-3"):
        assert expected in out, (expected, out)


def test_the_schedule_is_drawn_from_its_points():
    lines = lr_plot(plan().training_plan.learning_rate_schedule, width=54, height=5)
    bars = [line.split("┤" if "┤" in line else "│", 1)[1] for line in lines[:5]]
    assert lines[0].startswith("1.00e-04") and lines[4].startswith("1.00e-05")
    assert bars[-1] == "█" * 54  # the floor row is full
    top = bars[0]
    assert top[0] == " " and top[6] == "█" and top[-1] == " "  # warm-up from 1e-5, peak at steps 6-7, back down
    assert lines[5].strip().startswith("step 1") and lines[5].strip().endswith("step 54")


def test_get_of_a_failed_job_says_why_and_what_to_do():
    job = js.Job(id="job_1", state=js.JOB_STATE_FAILED, failure_reason="training needs at least 200 examples",
                 failure_kind=common_pb2.FAILURE_KIND_USER, spec=js.JobSpec(name="acme", base_model="llama-3.1-8b",
                                                                            method="sft"))
    text = "\n".join(job_summary(job))
    assert "acme (job_1): FAILED" in text and "training needs at least 200 examples" in text
    assert "jobs validate" in text  # the fix for the data or settings
    job.failure_kind = common_pb2.FAILURE_KIND_SYSTEM
    assert "fault of the platform" in "\n".join(job_summary(job))


def test_get_of_a_trained_job_compares_with_the_base_and_says_what_next():
    job = js.Job(id="job_2", state=js.JOB_STATE_SUCCEEDED, model_name="acme",
                 spec=js.JobSpec(name="acme", base_model="llama-3.1-8b", method="sft"))
    job.metrics.steps, job.metrics.epochs, job.metrics.train_seconds = 54, 2.0, 120
    job.metrics.eval_loss, job.metrics.base_eval_loss = 1.5, 3.0
    job.metrics.samples.add(prompt="Where is my order?", base_answer="I am a model.", tuned_answer="It ships today.")
    text = "\n".join(job_summary(job))
    assert "54 steps, 2.00 epochs, 2 min" in text
    assert "1.5000 fine-tuned vs 3.0000 base (-50.0 %)" in text
    assert "It ships today." in text and "I am a model." in text
    for command in ("models get acme", "models download acme ./acme", "models assign acme --agent AGENT_ID",
                    "models resolve acme"):
        assert f"tuneforge {command}" in text
