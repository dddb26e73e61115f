"""Small helpers for asset metadata shown in the Dagster UI."""

import dagster as dg
import polars as pl


def markdown_preview(frame: pl.DataFrame, rows: int = 5) -> dg.MetadataValue:
    """The first rows of a frame as a Markdown table."""
    with pl.Config(
        tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_cols=-1
    ):
        return dg.MetadataValue.md(str(frame.head(rows)))


def table_schema(schema: pl.Schema) -> dg.TableSchema:
    """A Polars schema as Dagster's column schema (`dagster/column_schema`, shown on the asset page)."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in schema.items()])
