"""Settings of `sapo` (tasks, group and round shape, training, the policy)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from swarm_node.strategies.options import StrategyOptions


class SapoOptions(StrategyOptions):
    SPEC_FIELDS: ClassVar[tuple[str, ...]] = ("sapo_group_size", "sapo_round_s", "sapo_tasks")
    MODEL_KINDS: ClassVar[tuple[str, ...]] = ("builtin",)
    MODEL_KINDS_REASON: ClassVar[str] = "its policy is the built-in GPT or --sapo-hf-model DIR"
    OWN_TRAINING_STEP: ClassVar[str] = "its policy trains by its own GRPO step"

    sapo_tasks: str = Field("add4", description="sapo: comma-separated tasks (add<K>, sub<K>, mul<K>; rg:<dataset> "
                            "with reasoning-gym installed).", pattern=r"^[A-Za-z0-9_:,.-]{1,256}$")
    sapo_group_size: int = Field(8, ge=2, le=64, description="sapo: completions per question (G).")
    sapo_round_s: float = Field(10.0, gt=0.5, le=3600, description="sapo: length of a swarm round (rounds are "
                                "wall-clock epochs, the same on every peer).")
    sapo_questions: int = Field(8, ge=1, le=64, description="sapo: questions this peer generates G completions "
                                "for and publishes each round (Q).")
    sapo_local_groups: int = Field(4, ge=1, le=64, description="sapo: local groups per update (I <= Q, chosen from "
                                   "this round's Q by --sapo-local-select).")
    sapo_local_select: Literal["informative", "first"] = Field(
        "informative", description="sapo: which I of the Q own groups to train on: drawn from those with non-zero "
                                   "reward variance (padded with the rest), or the first I.")
    sapo_external_groups: int = Field(4, ge=0, le=64, description="sapo: external groups per update (J; 0 = silo).")
    sapo_negative_scale: float = Field(0.0, ge=0, le=1, description="sapo: scale on negative advantages of external "
                                       "groups (0 = use only their positives; 1 = the paper).")
    sapo_deadline_frac: float = Field(0.6, gt=0, lt=1, description="sapo: fraction of the round after which this "
                                      "peer stops waiting for external rollouts and trains.")
    sapo_max_new_tokens: int = Field(6, ge=1, le=512, description="sapo: generated tokens per completion.")
    sapo_temperature: float = Field(1.0, gt=0, le=5, description="sapo: sampling temperature.")
    sapo_ppo_epochs: int = Field(4, ge=1, le=32, description="sapo: optimizer steps per round on the same batch.")
    sapo_warmstart_steps: int = Field(150, ge=0, le=100_000, description="sapo: supervised steps on the answer "
                                      "format (random digits) before the first round of a fresh model.")
    sapo_format_reward: float = Field(0.0, ge=0, le=1, description="sapo: reward for a well-formed wrong answer.")
    sapo_rounds: int = Field(0, ge=0, description="sapo: stop (drain, exit 0) after this many rounds (0 = forever).")
    sapo_peer_seed: int = Field(0, ge=0, description="sapo: seed of this peer's question and sampling draws (0 = "
                                "derived from the peer id). Not part of the run spec.")
    sapo_hf_model: str | None = Field(None, description="sapo: local path of a Hugging Face causal LM to use as the "
                                      "policy (needs transformers installed; default: the byte-level GPT).")


    def check(self, node: Any) -> None:
        from swarm_node.strategies.sapo import tasks as sapo_tasks  # pure stdlib

        if self.sapo_local_groups > self.sapo_questions:
            raise ValueError(f"sapo needs --sapo-local-groups ({self.sapo_local_groups}) <= --sapo-questions "
                             f"({self.sapo_questions})")
        try:
            names = sapo_tasks.parse_task_list(self.sapo_tasks)
        except sapo_tasks.TaskError as e:
            raise ValueError(f"--sapo-tasks: {e}") from None
        longest = max((sapo_tasks.max_prompt_chars(t) or 0) for t in names)
        if longest + self.sapo_max_new_tokens + 1 > node.seq_len and not self.sapo_hf_model:
            raise ValueError(f"sapo needs --seq-len >= {longest + self.sapo_max_new_tokens + 1} for these tasks "
                             f"(question up to {longest} bytes + --sapo-max-new-tokens + end of answer)")
        if self.sapo_hf_model:
            import importlib.util

            if importlib.util.find_spec("transformers") is None:
                raise ValueError("--sapo-hf-model needs transformers installed (pip install transformers); "
                                 "without it, leave the flag out to use the byte-level GPT")
            if not Path(self.sapo_hf_model).is_dir():
                raise ValueError(f"--sapo-hf-model {self.sapo_hf_model} is not a local model directory")

    def spec_fields(self, node: Any) -> dict[str, Any]:
        """Peers own their policies and may differ in model size: the model-size fields are left
        out (0 = per peer); what would break the exchange (G, tasks, the round clock) is in."""
        return {"n_layer": 0, "n_head": 0, "d_model": 0, **super().spec_fields(node)}
