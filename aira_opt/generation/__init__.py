"""Stage 5, tokens out: next-token selection, our generation loop, and the question-in answer-out chat."""
