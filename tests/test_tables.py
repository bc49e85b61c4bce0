"""Tables from synthetic records against hand-made Markdown and CSV; the paper's numbers."""

import logging

import pytest
from record_fixtures import scores_with_auroc, write_matching

from benchmark import paper, tables
from benchmark.records import Record
from datasets_builders.errors import NdbenchError

U, M = "uni-class", "multi-class"


def rec(method, dataset, setting, split, seed, auroc, config_hash="c1", created="2024-05-01T00:00Z", preset=""):
    return Record(
        method=method,
        config_hash=config_hash,
        config={},
        dataset=dataset,
        setting=setting,
        split=split,
        split_sha256="0" * 64,
        normal_classes=[],
        seed=seed,
        metrics={"auroc": auroc, "aupr_in": 0.5, "aupr_out": 0.5, "fpr95": 0.5},
        counts={"train": 1, "test_normal": 1, "test_novel": 1},
        train_seconds=1.0,
        inference_images_per_s=1.0,
        device="cpu",
        versions={},
        created=created,
        preset=preset,
    )


def records():
    """defend: 2 seeds per VOC class; knn: 1 seed; aaa (unknown, sorts last): class 1 only;
    kdad: an older config (AUROC 0.1) superseded by a newer one, both run with `--preset paper`
    (kdad's paper recipe), so its columns are not marked as measured with another preset."""
    return [
        rec("defend", "voc", U, "0", 0, 0.90),
        rec("defend", "voc", U, "0", 1, 0.95),
        rec("defend", "voc", U, "1", 0, 0.70),
        rec("defend", "voc", U, "1", 1, 0.80),
        rec("knn", "voc", U, "0", 0, 0.80),
        rec("knn", "voc", U, "1", 0, 0.60),
        rec("aaa", "voc", U, "1", 0, 0.50),
        rec("kdad", "voc", U, "0", 0, 0.10, "old", "2024-01-01T00:00Z", "paper"),
        rec("kdad", "voc", U, "0", 0, 0.60, "new", "2024-02-01T00:00Z", "paper"),
        rec("kdad", "voc", U, "1", 0, 0.70, "new", "2024-02-01T00:00Z", "paper"),
        rec("defend", "voc", M, "except-3", 0, 0.60),
        rec("defend", "voc", M, "except-0", 0, 0.50),
        rec("defend", "voc", M, "normal-0-1", 0, 0.65),
        rec("defend", "cifar10", U, "0", 0, 0.99),
        rec("defend", "cifar10", U, "1", 0, 0.97),
        rec("knn", "cifar10", U, "0", 0, 0.90),
        rec("knn", "cifar10", U, "1", 0, 0.88),
    ]


# defend class 0: mean(90, 95) = 92.5, std 3.5355; class 1: 75.0 +- 7.0711;
# AVG 83.75, std over the seed averages 80.0 and 87.5 = 5.3033.
VOC_UNI_MD = """\
| normal_class   | name      |   knn |     defend |   kdad |   aaa |
|:---------------|:----------|------:|-----------:|-------:|------:|
| 0              | aeroplane |  80.0 | 92.5 ± 3.5 |   60.0 |     – |
| 1              | person    |  60.0 | 75.0 ± 7.1 |   70.0 |  50.0 |
| AVG            |           |  70.0 | 83.8 ± 5.3 |   65.0 |  50.0 |
"""
VOC_UNI_CSV = """\
normal_class,name,knn,defend,defend_std,kdad,aaa
0,aeroplane,80.0,92.5,3.5355,60.0,
1,person,60.0,75.0,7.0711,70.0,50.0
AVG,,70.0,83.75,5.3033,65.0,50.0
"""


def test_per_class_uni_class_seeds_names_avg():
    df = tables.per_class_table(records(), "voc", U, class_names={0: "aeroplane", 1: "person"})
    assert tables.to_markdown(df) == VOC_UNI_MD
    assert tables.to_csv(df) == VOC_UNI_CSV


def test_newest_config_kept_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="benchmark.tables"):
        df = tables.per_class_table(records(), "voc", U)
    notes = [
        "kdad on voc uni-class: kept config new (2 splits, 2 jobs; the most splits, then jobs, then the newest); "
        "ignored 1 record(s) of config old (tabulate a trial config apart with its own --out)",
        "aaa on voc uni-class: AVG covers 1 of 2 rows",
    ]
    assert df.attrs["notes"] == notes
    assert [r.getMessage() for r in caplog.records] == notes


def test_a_newer_config_on_fewer_jobs_does_not_replace_a_complete_one():
    complete = [rec("knn", "voc", U, c, 0, 0.6, "default", "2024-01-01T00:00Z") for c in ("0", "1")]
    trial = [rec("knn", "voc", U, "0", 0, 0.9, "k5", "2024-03-01T00:00Z")]
    kept, notes = tables.select_records(complete + trial)
    assert kept == complete and "kept config default (2 splits, 2 jobs" in notes[0]
    many_seeds = [rec("knn", "voc", U, "0", seed, 0.9, "k5", "2024-03-01T00:00Z") for seed in range(5)]
    assert tables.select_records(complete + many_seeds)[0] == complete  # one split, however many seeds
    rerun = [rec("knn", "voc", U, c, 0, 0.9, "k5", "2024-03-01T00:00Z") for c in ("0", "1")]
    assert tables.select_records(complete + rerun)[0] == rerun  # as many jobs: the newest


def test_paper_columns_voc_uni_class():
    df = tables.per_class_table(records(), "voc", U, paper=True)
    # Table 6, class 0 (aeroplane): DEFEND+MKD 99.7, KDAD 96.2; printed AVG 95.3 and 83.0.
    assert df.at[0, "defend (paper T6)"] == 99.7
    assert df.at["AVG", "defend (paper T6)"] == 95.3
    assert df.at["AVG", "kdad (paper T6)"] == 83.0
    assert "knn (paper T6)" not in df.columns
    assert tables.to_markdown(df) == """\
| normal_class   |   knn |     defend |   defend (paper T6) |   kdad |   kdad (paper T6) |   aaa |
|:---------------|------:|-----------:|--------------------:|-------:|------------------:|------:|
| 0              |  80.0 | 92.5 ± 3.5 |                99.7 |   60.0 |              96.2 |     – |
| 1              |  60.0 | 75.0 ± 7.1 |                75.6 |   70.0 |              67.6 |  50.0 |
| AVG            |  70.0 | 83.8 ± 5.3 |                95.3 |   65.0 |              83.0 |  50.0 |
"""
    assert tables.to_csv(df) == """\
normal_class,knn,defend,defend_std,defend (paper T6),kdad,kdad (paper T6),aaa
0,80.0,92.5,3.5355,99.7,60.0,96.2,
1,60.0,75.0,7.0711,75.6,70.0,67.6,50.0
AVG,70.0,83.75,5.3033,95.3,65.0,83.0,50.0
"""


def test_multi_class_except_rows_and_paper():
    # except-k rows are the abnormal class k; normal-0-1 keeps its name and is not in AVG.
    df = tables.per_class_table(
        records(), "voc", M, class_names={0: "aeroplane", 3: "dog"}, paper=True
    )
    assert tables.to_markdown(df) == """\
| abnormal_class   | name      |   defend |   defend (paper T11) |
|:-----------------|:----------|---------:|---------------------:|
| 0                | aeroplane |     50.0 |                 40.9 |
| 3                | dog       |     60.0 |                 85.4 |
| normal-0-1       |           |     65.0 |                    – |
| AVG              |           |     55.0 |                 63.0 |
"""
    assert tables.to_csv(df) == """\
abnormal_class,name,defend,defend (paper T11)
0,aeroplane,50.0,40.9
3,dog,60.0,85.4
normal-0-1,,65.0,
AVG,,55.0,63.0
"""


def test_summary_with_paper_table4():
    df = tables.summary_table(records(), U, paper=True)
    assert tables.to_markdown(df) == """\
| dataset   |   knn |     defend |   defend (paper T4) |   kdad |   kdad (paper T4) |   aaa |
|:----------|------:|-----------:|--------------------:|-------:|------------------:|------:|
| voc       |  70.0 | 83.8 ± 5.3 |                95.4 |   65.0 |              82.8 |  50.0 |
| cifar10   |  89.0 |       98.0 |                98.6 |      – |              87.2 |     – |
"""
    assert tables.to_csv(df) == """\
dataset,knn,defend,defend_std,defend (paper T4),kdad,kdad (paper T4),aaa
voc,70.0,83.75,5.3033,95.4,65.0,82.8,50.0
cifar10,89.0,98.0,,98.6,,87.2,
"""


def test_leaderboard_sorted_by_mean():
    # knn (70 + 89) / 2 = 79.5; defend (83.75 + 55 + 98) / 3 = 78.9167.
    df = tables.leaderboard(records())
    assert tables.to_csv(df) == """\
method,voc uni-class,voc multi-class,cifar10 uni-class,mean
knn,70.0,,89.0,79.5
defend,83.75,55.0,98.0,78.9167
kdad,65.0,,,65.0
aaa,50.0,,,50.0
"""
    assert tables.to_markdown(df).splitlines()[2] == (
        "| knn      |            70.0 |                 – |                89.0 |   79.5 |"
    )


def test_write_tables(tmp_path):
    out = tmp_path / "tables"
    paths = tables.write_tables(
        records(), out, paper=True, class_names={"voc": {0: "aeroplane", 1: "person"}}
    )
    names = [p.name for p in paths]
    assert names == [
        "per_class_voc_uni-class.md", "per_class_voc_uni-class.csv",
        "per_class_voc_multi-class.md", "per_class_voc_multi-class.csv",
        "per_class_cifar10_uni-class.md", "per_class_cifar10_uni-class.csv",
        "summary_uni-class.md", "summary_uni-class.csv",
        "summary_multi-class.md", "summary_multi-class.csv",
        "leaderboard.md", "leaderboard.csv",
    ]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    voc_csv = (out / "per_class_voc_uni-class.csv").read_text(encoding="utf-8")
    assert voc_csv.splitlines()[1] == "0,aeroplane,80.0,92.5,3.5355,99.7,60.0,96.2,"
    md = (out / "per_class_voc_uni-class.md").read_text(encoding="utf-8")
    assert "| 0              | aeroplane |  80.0 | 92.5 ± 3.5 |" in md
    assert md.endswith("- aaa on voc uni-class: AVG covers 1 of 2 rows\n")
    # cifar10 has no per-class paper table (Table 3 is ViT-S16 MKD only): no paper column
    cifar = (out / "per_class_cifar10_uni-class.csv").read_text(encoding="utf-8")
    assert cifar == "normal_class,knn,defend\n0,90.0,99.0\n1,88.0,97.0\nAVG,89.0,98.0\n"
    # Without multi-class and cifar10 records, their tables go: they would contradict the leaderboard.
    (out / "notes.md").write_text("mine")
    again = tables.write_tables([r for r in records() if r.setting == U and r.dataset == "voc"], out)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in again] + ["notes.md"])
    assert "per_class_voc_multi-class.md" not in [p.name for p in again]


def test_bad_requests():
    with pytest.raises(NdbenchError, match="no run records for coco uni-class"):
        tables.per_class_table(records(), "coco", U)
    with pytest.raises(NdbenchError, match="paper reports AUROC only"):
        tables.per_class_table(records(), "voc", U, metric="fpr95", paper=True)
    with pytest.raises(NdbenchError, match="unknown metric 'acc'"):
        tables.leaderboard(records(), metric="acc")
    with pytest.raises(NdbenchError, match="no run records to tabulate"):
        tables.write_tables([], "unused")


def test_other_metric_in_percent():
    df = tables.per_class_table(records(), "cifar10", U, metric="fpr95")
    assert df.at["AVG", "knn"] == 50.0


def test_paper_reference_tables():
    t6 = paper.paper_per_class("voc", U)
    assert t6.shape == (20, 5)
    assert t6.loc[1].to_dict() == {
        "KDAD": 67.6, "RDAD": 42.4, "MSAD": 63.4, "Transformaly": 46.4, "DEFEND+MKD": 75.6
    }
    assert paper.paper_per_class_avg("voc", M)["RDAD"] == 46.2
    t9 = paper.paper_per_class("coco", U)
    assert len(t9) == 80 and t9.at[90, "DEFEND+MKD"] == 95.4
    # Table 9 prints no AVG: the mean over its 80 classes
    assert paper.paper_per_class_avg("coco", U)["DEFEND+MKD"] == pytest.approx(93.97)
    assert paper.paper_summary(M).at["coco", "DEFEND+MKD"] == 70.2
    assert paper.paper_summary(U).at["coco", "DEFEND+MKD"] == 94.5
    assert list(paper.paper_summary(U).index) == ["cifar10", "cifar100", "fmnist", "voc", "coco"]
    assert paper.paper_method("defend") == "DEFEND+MKD" and paper.paper_method("mkd") is None
    with pytest.raises(NdbenchError, match="no per-class table for cifar10 uni-class"):
        paper.paper_per_class("cifar10", U)


def test_voc_paper_columns_need_paper_class_order():
    voc = [r for r in records() if r.dataset == "voc" and r.setting == U]
    for r in voc:
        r.extra["class_order"] = "alphabetical"
    df = tables.per_class_table(voc, "voc", U, paper=True)
    assert [c for c in df.columns if "paper" in c] == []
    assert df.attrs["notes"][-1] == (
        "voc records use class order alphabetical, not the paper's; paper per-class columns "
        "left out (build with --class-order paper)"
    )


def manifests(root, dataset, setting, names):
    """Stand-in manifest files: only their names matter to the tables."""
    folder = root / dataset / setting
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}\n", encoding="utf-8")


# Every split of the setting gets a row, recorded or not; AVG keeps its value, and the
# coverage notes count against all four splits.
VOC_UNI_ALL_SPLITS_MD = """\
| normal_class   | name      |   knn |     defend |   defend (paper T6) |   kdad |   kdad (paper T6) |   aaa |
|:---------------|:----------|------:|-----------:|--------------------:|-------:|------------------:|------:|
| 0              | aeroplane |  80.0 | 92.5 ± 3.5 |                99.7 |   60.0 |              96.2 |     – |
| 1              | person    |  60.0 | 75.0 ± 7.1 |                75.6 |   70.0 |              67.6 |  50.0 |
| 2              |           |     – |          – |                97.6 |      – |              90.8 |     – |
| 3              |           |     – |          – |                91.9 |      – |              81.4 |     – |
| AVG            |           |  70.0 | 83.8 ± 5.3 |                95.3 |   65.0 |              83.0 |  50.0 |
"""
VOC_UNI_ALL_SPLITS_CSV = """\
normal_class,name,knn,defend,defend_std,defend (paper T6),kdad,kdad (paper T6),aaa
0,aeroplane,80.0,92.5,3.5355,99.7,60.0,96.2,
1,person,60.0,75.0,7.0711,75.6,70.0,67.6,50.0
2,,,,,97.6,,90.8,
3,,,,,91.9,,81.4,
AVG,,70.0,83.75,5.3033,95.3,65.0,83.0,50.0
"""


def test_manifest_splits_valid_names_only(tmp_path):
    manifests(tmp_path, "voc", U, ["0.json", "1.json", "2.json", "3.json", "except-2.json", "notes.json",
                                   "4.json.tmp", "normal-1.json"])
    (tmp_path / "voc" / U / "5.json").mkdir()
    manifests(tmp_path, "voc", M, ["except-0.json", "normal-0-1.json", "normal-.json", "3.json", "except-x.json"])
    (tmp_path / "voc" / "index.json").write_text("{}\n", encoding="utf-8")
    assert tables.manifest_splits(tmp_path) == {
        ("voc", U): ["0", "1", "2", "3"],
        ("voc", M): ["except-0", "normal-0-1"],
    }
    assert tables.manifest_splits(tmp_path / "absent") == {}


def test_per_class_rows_for_every_split_of_the_manifests(tmp_path):
    manifests(tmp_path, "voc", U, ["0.json", "1.json", "2.json", "3.json", "notes.json"])
    splits = tables.manifest_splits(tmp_path)[("voc", U)]
    df = tables.per_class_table(records(), "voc", U, class_names={0: "aeroplane", 1: "person"}, paper=True,
                                splits=splits, warn=False)
    assert tables.to_markdown(df) == VOC_UNI_ALL_SPLITS_MD
    assert tables.to_csv(df) == VOC_UNI_ALL_SPLITS_CSV
    assert [n for n in df.attrs["notes"] if "AVG covers" in n] == [
        "knn on voc uni-class: AVG covers 2 of 4 rows",
        "defend on voc uni-class: AVG covers 2 of 4 rows",
        "kdad on voc uni-class: AVG covers 2 of 4 rows",
        "aaa on voc uni-class: AVG covers 1 of 4 rows",
    ]
    # without manifests: the records' rows only, as before
    assert list(tables.per_class_table(records(), "voc", U, warn=False).index) == [0, 1, tables.AVG]


def test_table_command_lists_splits_without_records(tmp_path, capsys):
    from benchmark.cli import main
    from benchmark.records import record_path

    out = tmp_path / "results"
    for r in [r for r in records() if r.dataset == "voc"]:
        write_matching(record_path(out, r.method, r.dataset, r.setting, r.split, r.config_hash, r.seed), r,
                       *scores_with_auroc(r.metrics["auroc"]))
    manifests(out / "splits", "voc", U, [f"{c}.json" for c in range(10)] + ["README.json"])
    manifests(out / "splits", "voc", M, [f"except-{c}.json" for c in range(10)] + ["normal-0-1.json"])
    assert main(["table", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 9              |     – |" in printed
    csv = (out / "tables" / "per_class_voc_uni-class.csv").read_text(encoding="utf-8").splitlines()
    md = (out / "tables" / "per_class_voc_uni-class.md").read_text(encoding="utf-8")
    assert [line.split(",")[0] for line in csv[1:]] == [str(c) for c in range(10)] + ["AVG"]
    assert csv[3:11] == [f"{c},,,,," for c in range(2, 10)]
    assert csv[-1] == "AVG,70.0,83.75,5.3033,65.0,50.0"
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows == [str(c) for c in range(10)] + ["AVG"]
    assert "| 5              |     – |          – |      – |     – |" in md
    assert "- knn on voc uni-class: AVG covers 2 of 10 rows\n" in md
    assert "- aaa on voc uni-class: AVG covers 1 of 10 rows\n" in md
    multi = (out / "tables" / "per_class_voc_multi-class.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[0] for line in multi[1:]] == [str(c) for c in range(10)] + ["normal-0-1", "AVG"]
    assert multi[-1] == "AVG,55.0"
    summary = (out / "tables" / "summary_uni-class.md").read_text(encoding="utf-8")
    assert "- defend on voc uni-class: AVG covers 2 of 10 rows\n" in summary


def test_markdown_escapes_pipes_and_line_breaks_in_names_but_csv_and_html_keep_them(tmp_path):
    from benchmark.report_html import table_html

    names = {0: "cat|dog", 1: "two\nlines\r\tand tab"}
    rs = [rec("my|knn", "voc", U, "0", 0, 0.8), rec("my|knn", "voc", U, "1", 0, 0.6)]
    df = tables.per_class_table(rs, "voc", U, class_names=names, warn=False)
    assert tables.to_markdown(df) == """\
| normal_class   | name               |   my\\|knn |
|:---------------|:-------------------|----------:|
| 0              | cat\\|dog           |      80.0 |
| 1              | two lines  and tab |      60.0 |
| AVG            |                    |      70.0 |
"""
    assert tables.to_csv(df) == 'normal_class,name,my|knn\n0,cat|dog,80.0\n1,"two\nlines\r\tand tab",60.0\nAVG,,70.0\n'
    assert "<td class=\"l\">cat|dog</td>" in table_html(df, colours={}, best=set())
    assert "| my\\|knn  |            70.0 |   70.0 |" in tables.to_markdown(tables.leaderboard(rs))
    tables.write_tables(rs, tmp_path, class_names={"voc": names})
    md = (tmp_path / "per_class_voc_uni-class.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 5 and all(line.count("|") - line.count("\\|") == 4 for line in table)


def test_notes_say_which_rows_the_multi_class_avg_leaves_out(tmp_path):
    note = ("voc multi-class: AVG is over the class rows only; it leaves out normal-0-1 "
            "(runs on their own --normal class list)")
    df = tables.per_class_table(records(), "voc", M, warn=False)
    assert note in df.attrs["notes"]
    assert not any("leaves out" in n for n in tables.per_class_table(records(), "voc", U, warn=False).attrs["notes"])
    tables.write_tables(records(), tmp_path)
    for stem in ("per_class_voc_multi-class", "summary_multi-class", "leaderboard"):
        assert f"\n- {note}\n" in (tmp_path / f"{stem}.md").read_text(encoding="utf-8"), stem
    assert "leaves out" not in (tmp_path / "per_class_voc_uni-class.md").read_text(encoding="utf-8")
    # only all-vs-one splits: nothing left out, nothing said
    only = [r for r in records() if r.setting == M and r.split.startswith("except-")]
    assert tables.per_class_table(only, "voc", M, warn=False).attrs["notes"] == []


def test_the_table_command_reads_each_index_once(knn_results, monkeypatch, capsys):
    from benchmark.cli import main
    from datasets_builders.index import DatasetIndex

    reads = []
    original = DatasetIndex.read.__func__

    def counted(cls, folder, *args, **kwargs):
        reads.append(folder)
        return original(cls, folder, *args, **kwargs)

    monkeypatch.setattr(DatasetIndex, "read", classmethod(counted))
    assert main(["table", "--out", str(knn_results)]) == 0
    assert "embedded uni-class: AUROC" in capsys.readouterr().out
    assert len(reads) == 1, reads
