"""Home: the model card, the detected prompt kind, its parsed structure and its tokens."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from pages.common import get_model, get_prompt, page_header, render_tour, token_view_html
from pages.downloads import diagnosis_section, table_download
from ttt_core.encoding import EncodingError
from ttt_core.prompts import FewShotPrompt
from ttt_core.token_view import greedy_answer, tokenise

page_header("TTT Lens", "Does test-time training help on this prompt — when to adapt, how far, and in which directions?")

ROOT = Path(__file__).resolve().parent.parent
render_tour({str(p.relative_to(ROOT)) for p in (ROOT / "pages").glob("*.py")})

lm = get_model()
if lm is not None:
    card = lm.card()
    st.subheader("Model card")
    cols = st.columns(6)
    cols[0].metric("Parameters", f"{card['parameters'] / 1e6:.1f} M")
    cols[1].metric("Layers", card["layers"])
    cols[2].metric("Heads", card["heads"])
    cols[3].metric("KV heads", card["kv_heads"])
    cols[4].metric("dtype", card["dtype"])
    cols[5].metric("Device", card["device"])
    st.caption(f"{card['name']} · {card['architecture']} ({card['family']} family) · head dim {card['head_dim']} · "
               f"hidden {card['hidden_size']} · vocab {card['vocab_size']:,} · {card['source']} · loaded in {card['load_seconds']} s")
    st.caption(f"Weights fingerprint: `{lm.weights_fingerprint()[:12]}` (sha256 over every parameter, recomputed on each "
               "view: it stays the same while sessions adapt, because runs keep their own deltas)")

prompt = get_prompt(lm)
if prompt is not None:
    st.subheader("Prompt")
    if isinstance(prompt, FewShotPrompt):
        st.markdown(f"**Detected kind:** few-shot ({prompt.n} demonstrations, separator `{prompt.sep}`) — DESIGN §7.1")
        values = prompt.label_values()
        df = pd.DataFrame([{"#": i + 1, "x": x, "y": y, "value in [0,1]": round(values[y], 4)}
                           for i, (x, y) in enumerate(prompt.demos)])
        left, right = st.columns([2, 1])
        left.dataframe(df, hide_index=True, key="demos_table")
        with left:
            table_download(df, "home_demos", lm, prompt, settings={})
        right.markdown(f"**Query:** `{prompt.query_x}`  \n**True answer:** "
                       f"{'`' + prompt.query_y + '`' if prompt.query_y is not None else '_not given (add `# answer: y`)_'}  \n"
                       f"**Label set:** {', '.join(f'`{y}`' for y in prompt.labels)}  \n"
                       f"**Labels are** {'numeric' if prompt.numeric else 'categorical (ordinal values)'}")
    else:
        kind = "long context + question" if prompt.question else "free text (no question)"
        st.markdown(f"**Detected kind:** {kind} — DESIGN §7.2")
        c1, c2, c3 = st.columns(3)
        c1.metric("Context characters", f"{len(prompt.context):,}")
        c2.metric("Marked needles", len(prompt.needle_spans))
        c3.metric("Expected answer", prompt.answer or "—")
        if prompt.question:
            st.markdown(f"**Question:** {prompt.question}")
        for s, e in prompt.needle_spans:
            st.markdown(f"**Needle:** “{prompt.context[s:e]}”")

tp = None
if lm is not None and prompt is not None:
    try:
        tp = tokenise(lm, prompt)
    except EncodingError as exc:
        st.warning(f"The prompt cannot be tokenised for the engines: {exc}")
if tp is not None:
    st.subheader(f"Tokens ({len(tp.ids):,})")
    st.caption("What the model reads, one chip per token (hover for the index). Needle tokens are outlined.")
    shown = 1500
    st.html(token_view_html(tp.tokens[:shown], tp.needle_tokens))
    if len(tp.ids) > shown:
        st.caption(f"… {len(tp.ids) - shown:,} more tokens not drawn.")
    with st.expander("Token table"):
        st.dataframe(tokens_df := pd.DataFrame({"index": range(len(tp.ids)), "token": tp.tokens, "id": tp.ids}),
                     hide_index=True, key="token_table")
        table_download(tokens_df, "home_tokens", lm, prompt, settings={})
    if st.button("Show the model's answer (greedy, no adaptation)", key="answer_btn"):
        with st.spinner("Generating…"):
            st.session_state["home_answer"] = (tp.text, greedy_answer(lm, prompt))
    ans = st.session_state.get("home_answer")
    if ans and ans[0] == tp.text:
        st.markdown(f"**Model's answer:** `{ans[1]}`")

if lm is not None and prompt is not None:
    diagnosis_section(lm, prompt, "home")
