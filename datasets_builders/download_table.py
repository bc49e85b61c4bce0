"""What the download command fetches: every file's URL, size and published checksum, and where
it lands so that `build-splits` reads the result with no other step.

Checksums are copied from where they were published, never computed here from a download:
- torchvision (torchvision/datasets/voc.py, cifar.py, mnist.py) publishes the md5 of the VOC
  tarballs, the CIFAR python tarballs and the MNIST / Fashion-MNIST idx files it downloads;
- COCO publishes no checksums; TensorFlow Datasets records the sha256 and size of each COCO
  zip and checks them on every download (tensorflow/datasets,
  tensorflow_datasets/url_checksums/coco2014.txt and coco2017.txt), and those are used;
- where a checksum decides, sizes only feed the progress bar and the free-space check; they
  are TFDS's records of the same files (url_checksums voc.txt, for the pjreddie.com copies of
  the VOC tarballs; mnist.txt; fashion_mnist.txt) and, for the CIFAR python tarballs, the
  Content-Length the Toronto host serves (170498071 and 169001437 bytes).
The VOC2012 `trainaug` extras (paper: 10,582 training images) have no official home:
- the list is DeepLabV3Plus-Pytorch's `datasets/data/train_aug.txt`, fetched from a pinned
  commit so its bytes cannot change; its sha256 is that of the blob at that commit (git blob
  48a784f6d822332c601a3571e70abbb95ac9bb72);
- the masks are `SegmentationClassAug.zip` from the Dropbox link of DrSleep's
  tensorflow-deeplab-resnet, which DeepLab-style repositories share. Nobody publishes its
  checksum or size, so neither is checked: only the zip's own per-member CRC-32s are (on
  extraction). `--mirror` lets a lab serve a copy it trusts.

A mirror (`--mirror URL`) serves each file at `<mirror>/<dataset>/<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: an archive extracted under `target`, or a plain file saved as `target`."""

    name: str  # the file's name; under a mirror it is read from <mirror>/<dataset>/<name>
    url: str  # the official URL
    size: int | None  # bytes, as published (None: not published)
    md5: str | None = None
    sha256: str | None = None
    archive: bool = True
    target: str = ""  # archive: folder it is extracted into; plain file: its path (relative to the root)
    provides: tuple[str, ...] = ()  # paths (relative to the root) that exist once it is in place
    annotations: bool = False  # fetched by `--only annotations`
    skip: tuple[str, ...] = ()  # top-level archive folders not extracted (e.g. macOS metadata)

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) of the published checksum, if any."""
        if self.sha256:
            return "sha256", self.sha256
        if self.md5:
            return "md5", self.md5
        return None


_VOC2012 = "VOCdevkit/VOC2012"
_VOC2007 = "VOCdevkit/VOC2007"
_DEEPLAB_COMMIT = "360cb36524d8db20135b2e73aacc46c62b1c1e75"

VOC2012 = (
    RemoteFile(
        name="VOCtrainval_11-May-2012.tar",
        url="https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        size=1999639040,
        md5="6cd6e144f989b92b3379bac3b3de84fd",
        provides=(f"{_VOC2012}/JPEGImages", f"{_VOC2012}/Annotations", f"{_VOC2012}/ImageSets/Segmentation/val.txt"),
    ),
    RemoteFile(
        name="SegmentationClassAug.zip",
        url="https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
        size=None,  # not published; no checksum either (see the module docstring)
        target=_VOC2012,
        provides=(f"{_VOC2012}/SegmentationClassAug",),
        skip=("__MACOSX",),
    ),
    RemoteFile(
        name="train_aug.txt",
        url=f"https://raw.githubusercontent.com/VainF/DeepLabV3Plus-Pytorch/{_DEEPLAB_COMMIT}/datasets/data/train_aug.txt",
        size=126984,
        sha256="5afcea7af8ffc61b62d1618b2051d350ed8fde25564821b6b4ff84c02eaaf368",
        archive=False,
        target=f"{_VOC2012}/ImageSets/Segmentation/train_aug.txt",
    ),
)

VOC2007 = (
    RemoteFile(
        name="VOCtrainval_06-Nov-2007.tar",
        url="https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
        size=460032000,
        md5="c52e279531787c972589f7e41ab4ae64",
        provides=(f"{_VOC2007}/JPEGImages", f"{_VOC2007}/ImageSets/Main/trainval.txt"),
    ),
    RemoteFile(
        name="VOCtest_06-Nov-2007.tar",
        url="https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar",
        size=451020800,
        md5="b6e924de25625d8de591ea690078ad9f",
        provides=(f"{_VOC2007}/ImageSets/Main/test.txt",),
    ),
)


def _coco(year: int, sizes: dict[str, int], sha256: dict[str, str]) -> tuple[RemoteFile, ...]:
    annotations = f"annotations_trainval{year}.zip"
    return (
        RemoteFile(
            name=annotations,
            url=f"http://images.cocodataset.org/annotations/{annotations}",
            size=sizes[annotations],
            sha256=sha256[annotations],
            provides=(f"annotations/instances_train{year}.json", f"annotations/instances_val{year}.json"),
            annotations=True,
        ),
        *(
            RemoteFile(
                name=f"{split}{year}.zip",
                url=f"http://images.cocodataset.org/zips/{split}{year}.zip",
                size=sizes[f"{split}{year}.zip"],
                sha256=sha256[f"{split}{year}.zip"],
                provides=(f"{split}{year}",),
            )
            for split in ("train", "val")
        ),
    )


COCO2014 = _coco(
    2014,
    sizes={"annotations_trainval2014.zip": 252872794, "train2014.zip": 13510573713, "val2014.zip": 6645013297},
    sha256={
        "annotations_trainval2014.zip": "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
        "train2014.zip": "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
        "val2014.zip": "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
    },
)
COCO2017 = _coco(
    2017,
    sizes={"annotations_trainval2017.zip": 252907541, "train2017.zip": 19336861798, "val2017.zip": 815585330},
    sha256={
        "annotations_trainval2017.zip": "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
        "train2017.zip": "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
        "val2017.zip": "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
    },
)

CIFAR10 = (
    RemoteFile(
        name="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        size=170498071,
        md5="c58f30108f718f92721af3b95e74349a",
        provides=("cifar-10-batches-py",),
    ),
)
CIFAR100 = (
    RemoteFile(
        name="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        size=169001437,
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        provides=("cifar-100-python",),
    ),
)


def _idx_files(base_url: str, files: tuple[tuple[str, int, str], ...]) -> tuple[RemoteFile, ...]:
    """The four gzipped idx files, kept as they are (the builder reads `.gz`) in the root."""
    return tuple(
        RemoteFile(name=name, url=base_url + name, size=size, md5=md5, archive=False, target=name)
        for name, size, md5 in files
    )


MNIST = _idx_files(
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    (
        ("train-images-idx3-ubyte.gz", 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte.gz", 28881, "d53e105ee54ea40749a09fcbcd1e9432"),
        ("t10k-images-idx3-ubyte.gz", 1648877, "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
)
FMNIST = _idx_files(
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    (
        ("train-images-idx3-ubyte.gz", 26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte.gz", 29515, "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte.gz", 4422102, "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte.gz", 5148, "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
)

# (dataset, year) -> its files; the first year listed for a dataset is its default.
TABLE: dict[tuple[str, int | None], tuple[RemoteFile, ...]] = {
    ("voc", 2012): VOC2012,
    ("voc", 2007): VOC2007,
    ("coco", 2014): COCO2014,
    ("coco", 2017): COCO2017,
    ("cifar10", None): CIFAR10,
    ("cifar100", None): CIFAR100,
    ("mnist", None): MNIST,
    ("fmnist", None): FMNIST,
}
