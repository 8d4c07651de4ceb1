"""Pure figure builders: functions from numbers to plotly figures (no Streamlit, no model)."""
