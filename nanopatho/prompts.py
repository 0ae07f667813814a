"""The fixed prompt text shared by data generation, SFT, RL and evaluation.

Every stage must show the model the same system prompt and the same question layout,
otherwise evaluation measures a prompt mismatch instead of the model. Usage:

    from nanopatho.prompts import SYSTEM_PROMPT, format_question
    user_text = format_question("Which tissue is shown?", ["A) adipose", "B) mucus"])
"""

SYSTEM_PROMPT = (
    "You are a pathology assistant. Look at the H&E tile, reason step by step inside "
    "<think></think>, then give the final answer inside <answer></answer>."
)


def format_question(question, options=None):
    """User turn text: the image placeholder, the question, and the lettered options if any."""
    text = f"<image>\n{question.strip()}"
    if options:
        text += "\nOptions:\n" + "\n".join(o.strip() for o in options)
    return text
