"""Pure translations between the APIs clients speak and the OpenAI API every call goes by.

One module per API (`ollama`, `anthropic`): its requests as OpenAI request bodies, and OpenAI
answers, whole or streamed, as that API's answers. No I/O and no clock of their own (times are
passed in), so each is tested on its own (tests/test_translate_*.py).
"""
