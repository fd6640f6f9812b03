"""Batch prediction on a Ray cluster: the same records and submission as ``severstal predict``, on many workers.

Ray Data runs the pipeline; nothing here schedules work itself::

    list the images (folder, glob, or any URI pyarrow reads: s3://, gs://, hdfs://)   on the driver
    -> a dataset of (image_id, path)
    -> map_batches(read_files)           Ray tasks read the bytes; a file that cannot be read becomes an error
    -> map_batches(PredictActor)         a pool of actors, each loading the model once (a GPU each where the
                                         cluster has GPUs, a fraction of a CPU otherwise); decoding, the
                                         network, thresholds and RLE are the single-process code
                                         (:func:`severstal.model.predict.predict_readable`)
    -> the submission (written by the driver, sorted like ``severstal predict``) and, on request, Parquet
       files of the full records (written by the workers)

The model travels through Ray's object store (the driver reads the run folder once), so the workers need
the same Python environment but not the run folder. Images and the Parquet folder must be where every
worker can read and write them: a shared file system or an object store. This module imports Ray; nothing
else in the package does, so Ray costs nothing to users who never ask for it.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import posixpath
import tempfile
from fnmatch import fnmatch
from pathlib import Path

try:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(f"Ray prediction needs Ray Data: pip install 'severstal[ray]' ({err})") from err

from severstal import CLASS_IDS
from severstal.data.annotations import IMAGE_SUFFIXES, list_images
from severstal.data.images import decode_image
from severstal.model.backends import choose_backend
from severstal.model.config import load_bundle
from severstal.model.predict import Predictor, predict_readable, submission_summary, unreadable_record
from severstal.model.run import files_with_model

log = logging.getLogger(__name__)

LOCAL = "local"
"""The ``address`` that starts a Ray of this machine for the run (and stops it after)."""
READ_CPUS = 0.25
"""CPUs a read task asks for: reading is I/O; whole CPUs would keep actors waiting on a small machine."""

_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}
_RLE_COLUMNS = [f"rle_{c}" for c in CLASS_IDS]
RECORD_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
     ("error", pa.string())]
    + [(name, pa.string()) for name in _RLE_COLUMNS]
    + [("defects", pa.list_(pa.struct([("class_id", pa.int8()), ("score", pa.float32()),
                                      ("bbox", pa.list_(pa.float32(), 4)), ("area", pa.int64()),
                                      ("rle", pa.string())])))]
)
"""One row per image in the Parquet output: the REST record flattened (``rle_1`` .. ``rle_4`` are the class
masks in Kaggle's RLE, ``defects`` the instances); ``error`` is null unless the image could not be read."""


def list_image_uris(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The image files of ``source`` and the file system to read them with.

    Args:
        source: a folder (its ``.jpg``/``.jpeg``/``.png`` files, not recursive), one image file, a glob
            (local: any ``glob`` pattern, ``**`` included; remote: wildcards in the last part only), each also
            as a URI that pyarrow's file systems read (``s3://bucket/images/``, ``gs://...``).

    Returns:
        ``(filesystem, paths)``, paths in that file system's terms, sorted by file name.

    Raises:
        FileNotFoundError: nothing matches.
        ValueError: two files share a name (the submission's ImageId is the file name).
    """
    wildcard = any(ch in source for ch in "*?[")
    if "://" in source:
        filesystem, path = pafs.FileSystem.from_uri(source.rstrip("/") if not wildcard else source)
        folder, pattern = (posixpath.dirname(path), posixpath.basename(path)) if wildcard else (path, None)
        info = filesystem.get_file_info(folder)
        if pattern is None and info.type == pafs.FileType.File:
            paths = [folder]
        elif info.type == pafs.FileType.Directory:
            entries = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False))
            paths = [e.path for e in entries if e.type == pafs.FileType.File
                     and (fnmatch(e.base_name, pattern) if pattern else e.extension.lower() in _EXTENSIONS)]
        else:
            paths = []
    else:
        filesystem = pafs.LocalFileSystem()
        if wildcard:
            paths = [os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        elif os.path.isdir(source):
            paths = [os.path.abspath(os.path.join(source, name)) for name in list_images(source)]
        else:
            paths = [os.path.abspath(source)] if os.path.isfile(source) else []
    if not paths:
        raise FileNotFoundError(f"no images at {source} (a folder of .jpg/.jpeg/.png, an image, a glob or a URI)")
    paths.sort(key=lambda p: (posixpath.basename(p), p))
    names = [posixpath.basename(p) for p in paths]
    clashes = sorted({n for a, n in zip(names, names[1:]) if a == n})
    if clashes:
        raise ValueError(f"{len(clashes)} file name(s) occur in more than one folder, e.g. {clashes[:3]}: "
                         "the submission's ImageId is the file name; predict each folder on its own")
    return filesystem, paths


def read_files(batch: pa.Table, filesystem: pafs.FileSystem) -> pa.Table:
    """A Ray Data batch of ``image_id, path`` -> the same with the file's ``data`` and a ``read_error``.

    A file that cannot be read (gone, no permission, a failing disk) gets empty data and the error: it
    must not fail the task, or Ray would retry and finally fail the whole run for one file.
    """
    data, errors = [], []
    for path in batch.column("path").to_pylist():
        try:
            with filesystem.open_input_stream(path) as stream:
                data.append(stream.read())
            errors.append(None)
        except OSError as err:
            data.append(b"")
            errors.append(f"{path}: cannot read ({err})")
    return batch.append_column("data", pa.array(data, pa.binary())).append_column("read_error",
                                                                                  pa.array(errors, pa.string()))


def records_table(image_ids: list[str], paths: list[str], records: list[dict]) -> pa.Table:
    """Records (the REST answer, or :func:`unreadable_record`) as a table of :data:`RECORD_SCHEMA`."""
    rows = [{"image_id": i, "path": p, "height": r["height"], "width": r["width"], "error": r.get("error"),
             **{f"rle_{c}": r["classes"][c] for c in r["classes"]},
             "defects": [{k: d[k] for k in ("class_id", "score", "bbox", "area", "rle")} for d in r["defects"]]}
            for i, p, r in zip(image_ids, paths, records)]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


class PredictActor:
    """One model replica of the actor pool: loads the model once, then predicts batches of files' bytes.

    Args:
        model_files: the run (or export) folder's files by name (the model file and those that go with it,
            ``severstal.model.run.WITH_MODEL``), written to a local temporary folder and loaded from there.
        model_name: which of them is the model file.
        device: "cuda" (the GPU Ray gave this actor) or "cpu".
        threads: PyTorch's CPU threads in this actor (Ray's fractional CPUs do not limit them).
    """

    def __init__(self, model_files: dict[str, bytes], model_name: str, device: str, threads: int,
                 backend: str | None = None, tta: bool = False, precision: str | None = None):
        import torch

        torch.set_num_threads(threads)
        self._folder = tempfile.TemporaryDirectory(prefix="severstal-ray-model-")
        for name, data in model_files.items():
            (Path(self._folder.name) / name).write_bytes(data)
        self.predictor = Predictor.from_weights(Path(self._folder.name) / model_name, device=device, tta=tta,
                                                backend=backend, precision=precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        readers = []
        for path, data, error in zip(paths, batch.column("data").to_pylist(), batch.column("read_error").to_pylist()):
            readers.append(_failing(error) if error else (lambda d=data, p=path: decode_image(d, source=p)))
        records = predict_readable(self.predictor, readers)
        return records_table(batch.column("image_id").to_pylist(), paths, records)


def _failing(message: str):
    def read():
        raise OSError(message)

    return read


def _model_files(weights: str | Path) -> tuple[dict[str, bytes], str]:
    """The files a worker needs to load ``weights`` (validated here, on the driver, with a clear error)."""
    bundle = load_bundle(weights, device="cpu")
    files = {path.name: path.read_bytes() for path in [bundle.weights, *files_with_model(bundle.folder)]}
    return files, bundle.weights.name


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: the caller's when already initialised, a cluster's ``address``, or a new local one.

    A local Ray starts offline and quickly: no dashboard, no usage statistics; its workers' output is not
    forwarded (errors still reach the driver as exceptions). Ray 2.60 turns token authentication on by
    default: a local Ray makes its own token; a cluster's must be in ``$RAY_AUTH_TOKEN`` or
    ``~/.ray/auth_token`` where the driver runs.

    Args:
        address: None or :data:`LOCAL` (a Ray of this machine for the run), "auto" (the cluster this machine
            belongs to, started with ``ray start``), or ``HOST:PORT`` of a cluster's head (port 6379).
        num_cpus: CPUs of a local Ray (default: all of this machine's).

    Returns:
        Whether this call started or connected Ray (and the caller should :func:`ray.shutdown` it).
    """
    if ray.is_initialized():
        return False
    if address in (None, LOCAL):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # address="local": a new Ray of its own, never a cluster someone started on this machine with `ray start`
        # (a bare ray.init() would join that one).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def plan_pool(resources: dict, actors: int | None = None, cpus_per_actor: float | None = None,
              gpus_per_actor: float | None = None) -> dict:
    """The actor pool for a cluster's resources: how many replicas, and what each asks of Ray.

    With GPUs in the cluster (and ``gpus_per_actor`` not 0): one actor per GPU by default, each with one CPU
    for decoding and post-processing. Without: one actor per two CPUs (at least one), sharing all CPUs but
    a little left for the read tasks (:data:`READ_CPUS`); on a 2-CPU machine one actor with 1.5 CPUs.
    Actors asking whole CPUs on a small machine would leave none for reading, and the run would never end.

    Args:
        resources: ``ray.cluster_resources()``.

    Returns:
        ``{"actors", "cpus_per_actor", "gpus_per_actor", "threads", "device"}``; ``threads`` is PyTorch's
        CPU threads per actor (its CPUs rounded, at least 1).

    Raises:
        ValueError: a request the cluster cannot hold, saying what it has.
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    bad_actors = actors is not None and actors < 1
    if bad_actors or gpus_per_actor < 0 or (cpus_per_actor is not None and cpus_per_actor <= 0):
        raise ValueError(f"need actors >= 1, cpus_per_actor > 0, gpus_per_actor >= 0; got {actors}, "
                         f"{cpus_per_actor}, {gpus_per_actor}")
    if gpus_per_actor > 0:
        if gpus < gpus_per_actor:
            raise ValueError(f"{gpus_per_actor} GPU(s) per actor asked, the cluster has {gpus:g} GPUs; "
                             "use --gpus-per-actor 0 for CPU actors")
        actors = actors or max(1, int(gpus // gpus_per_actor))
        cpus_per_actor = cpus_per_actor or min(1.0, max(cpus - READ_CPUS, READ_CPUS) / actors)
    else:
        actors = actors or max(1, int(cpus // 2))
        cpus_per_actor = cpus_per_actor or max(READ_CPUS, (cpus - 2 * READ_CPUS) / actors)
    if actors * cpus_per_actor + READ_CPUS > cpus + 1e-9:
        raise ValueError(f"{actors} actors x {cpus_per_actor:g} CPUs leave no CPU to read files on a cluster of "
                         f"{cpus:g} CPUs: ask fewer actors or a fraction of a CPU each (--cpus-per-actor 0.5)")
    return {"actors": int(actors), "cpus_per_actor": float(cpus_per_actor), "gpus_per_actor": float(gpus_per_actor),
            "threads": max(1, round(cpus_per_actor)), "device": "cuda" if gpus_per_actor > 0 else "cpu"}


def predict_ray(weights: str | Path, images: str, out: str | Path, *, address: str | None = None, fmt: str = "new",
                tta: bool = False, backend: str | None = None, precision: str | None = None, batch_size: int = 4,
                actors: int | None = None,
                cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
                parquet: str | None = None, num_cpus: int | None = None, progress: bool = True) -> dict:
    """Predict images on Ray and write the same Kaggle submission as :func:`severstal.model.predict.predict_folder`.

    Args:
        weights: a run's weights file or folder, or an exported model (read on the driver, shipped to the actors).
        images: see :func:`list_image_uris`; every worker must be able to read these paths.
        out: submission CSV (on the driver's machine), written atomically; every image gets its four rows.
        address: see :func:`connect`; None starts a local Ray for this run and stops it after.
        backend, precision: as :meth:`severstal.model.predict.Predictor.from_weights`, chosen in each actor.
        batch_size: images per actor call.
        actors, cpus_per_actor, gpus_per_actor: the pool (see :func:`plan_pool`).
        parquet: also write the full records (:data:`RECORD_SCHEMA`) as Parquet files into this folder (any
            URI pyarrow writes; on a cluster a shared one); ``pandas.read_parquet(folder)`` reads them back, in
            no particular order.
        num_cpus: CPUs of a local Ray (default: all).
        progress: Ray Data's progress bars.

    Returns:
        :func:`severstal.model.predict.submission_summary`'s dict, ``unreadable`` included, plus ``pool``
        (:func:`plan_pool`), ``parquet`` and ``backend`` (the backend and precision as chosen on the driver's
        machine; each actor chooses the same way on its own).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    filesystem, paths = list_image_uris(str(images))
    model_files, model_name = _model_files(weights)
    started = connect(address, num_cpus=num_cpus)
    try:
        pool = plan_pool(ray.cluster_resources(), actors, cpus_per_actor, gpus_per_actor)
        # Check the backend and precision here, where a bad name is one clear error rather than every actor's.
        choice = choose_backend(model_name, pool["device"], backend, precision)
        log.info("ray: %d images, %d actors x (%g CPU, %g GPU, %d threads), batch %d", len(paths), pool["actors"],
                 pool["cpus_per_actor"], pool["gpus_per_actor"], pool["threads"], batch_size)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        image_ids = [posixpath.basename(p) for p in paths]
        blocks = min(math.ceil(len(paths) / batch_size), 200)
        ds = ray.data.from_items([{"image_id": i, "path": p} for i, p in zip(image_ids, paths)],
                                 override_num_blocks=blocks)
        ds = ds.map_batches(read_files, batch_format="pyarrow", batch_size=batch_size, num_cpus=READ_CPUS,
                            fn_kwargs={"filesystem": filesystem})
        ds = ds.map_batches(PredictActor, batch_format="pyarrow", batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=pool["actors"]),
                            num_cpus=pool["cpus_per_actor"], num_gpus=pool["gpus_per_actor"] or None,
                            fn_constructor_kwargs={"model_files": model_files, "model_name": model_name,
                                                   "device": pool["device"], "threads": pool["threads"],
                                                   "backend": backend, "tta": tta, "precision": precision})
        if parquet:
            ds = ds.materialize()
            target = parquet if "://" in str(parquet) else os.path.abspath(parquet)
            ds.write_parquet(target, ray_remote_args={"num_cpus": READ_CPUS})
        found: dict[str, dict] = {}
        # Columns are picked here on the driver: a select_columns stage would be one more task asking a whole
        # CPU, which a small cluster whose CPUs the actors hold cannot give, and the run would never end.
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.select(["image_id", "error", *_RLE_COLUMNS]).to_pylist():
                found[row["image_id"]] = {"classes": {str(c): row[f"rle_{c}"] for c in CLASS_IDS},
                                          "error": row["error"]}
    finally:
        if started:
            ray.shutdown()
    lost = [i for i in image_ids if i not in found]
    if lost:  # Ray Data returns every row or raises; a gap would be a bug here, not a bad file
        raise RuntimeError(f"{len(lost)} image(s) came back from Ray without a record, e.g. {lost[:3]}")
    records = [found[i] if found[i]["error"] is None else unreadable_record(found[i]["error"]) for i in image_ids]
    summary = submission_summary(image_ids, records, out, fmt=fmt)
    summary.update(pool=pool, parquet=str(parquet) if parquet else None, backend=str(choice))
    return summary
