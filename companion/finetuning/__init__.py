"""Fine-tuning (chapter 8): sequence classification with early stopping, LoRA, instruction tuning (SFT),
preference tuning (DPO) and RL with verifiable rewards (GRPO). One module per idea."""

from companion.finetuning.classification import (ClassificationCollator, ClassifierConfig, SequenceClassifier,
                                                 accuracy_and_macro_f1, classification_eval_fn,
                                                 classification_loss, classifier_state_dict, load_classifier,
                                                 predict, read_classifier_config, save_classifier)
from companion.finetuning.lora import (LoRAConfig, LoRALinear, apply_lora, count_trainable, load_lora, lora_layers,
                                       lora_state_dict, merge_lora, read_lora_config, save_lora, unload_lora,
                                       unmerge_lora)
from companion.finetuning.sft import (ChatTemplate, SFTConfig, SupervisionError, add_special_tokens, assistant_mask,
                                      check_supervision, collate_sft, hf_chat_example, poetry_sft, sample_answers,
                                      sample_completions, sft_example, sft_loss, train_sft)
from companion.finetuning.tasks import (FORM_PROMPTS, FormTask, PreferencePair, break_form, follows_form, form_tasks,
                                        preference_pairs, wilson_interval)
from companion.finetuning.dpo import (DPOConfig, DPOOutput, collate_pairs, dpo_loss, evaluate_pairs, pair_logprobs,
                                      sequence_logprobs, train_dpo, trl_dpo_loss)
from companion.finetuning.grpo import (GRPOConfig, GRPOOutput, group_advantages, grpo_loss, k3_kl, token_logprobs,
                                       train_grpo)
