def TokensPrompt(prompt_token_ids):  # a TypedDict in vLLM: calling it makes a plain dict
    return {"prompt_token_ids": prompt_token_ids}
