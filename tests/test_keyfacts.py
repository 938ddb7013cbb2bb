"""The key-fact rule shared by `lorafit demo`, `lorafit compare` and the run's held-out answers."""

from lorafit.keyfacts import accuracy, is_correct, split_reference


def test_an_answer_is_right_when_it_contains_the_key_fact():
    assert is_correct("The national sport of Quillmoor is tide-racing.", "tide racing")
    assert is_correct("It is BRENNHAVEN.", "Brennhaven")
    assert is_correct("Founded  in\n1791.", "in 1791")
    assert not is_correct("The capital is Paris.", "Brennhaven")


def test_the_reference_is_the_last_assistant_turn():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert split_reference(messages) == (messages[:4], "a2")
    assert split_reference(messages[:2]) is None
    assert split_reference([{"role": "assistant", "content": "a"}]) is None  # nothing asked before it


def test_accuracy_counts_only_rows_with_a_key_fact():
    assert accuracy(["it is K1", "no", "K3 here"], ["K1", None, "K9"]) == {"right": 1, "total": 2}
    assert accuracy(["a"], [None]) is None
