from llama import Llama


def test_greedy_runs(generator):
    out = generator.text_completion(["Hello world"], max_gen_len=4, temperature=0)
    assert isinstance(out[0]["generation"], str)
