"""Real FITS files (shipped in the astropy and ccdproc wheels) through ingest and ccd_stack;
damaged files and checksum mismatches refused; the products and their provenance; the
algorithm registry."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import astropy
import ccdproc
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from commands.algorithms import (
    AlgorithmInput,
    LocalReporter,
    UnknownAlgorithm,
    algorithm,
    describe,
    input_records,
    registered_algorithms,
    validate_inputs,
)
from domain.errors import InvalidCommand
from domain.reduction import ReductionCancelled
from infra.fits_products import (
    FitsRejected,
    ProductProvenance,
    ingest_fits,
    open_image_rows,
)
from tests.integration.test_reduction import gaussian_star

ASTROPY_DATA = Path(astropy.__file__).parent / "io" / "fits" / "tests" / "data"
STIS = ASTROPY_DATA / "o4sp040b0_raw.fits"  # HST/STIS raw, SCI extensions 44x62
WFPC2 = ASTROPY_DATA / "test0.fits"  # WFPC2, four 40x40 SCI extensions
SAAO = Path(ccdproc.__file__).parent / "tests" / "data" / "a8280271.fits"  # SAAO 1.0m CCD
REAL_FILES = [STIS, WFPC2, SAAO]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def science_hdu(path: Path) -> int:
    """The first SCI extension, else the primary HDU (read here independently of the code)."""
    with fits.open(path) as hdul:
        return next((i for i, h in enumerate(hdul) if h.name == "SCI"), 0)


def as_input(path: Path, file_type: str | None = None, metadata: dict[str, Any] | None = None,
             name: str | None = None) -> AlgorithmInput:
    return AlgorithmInput(file_id=uuid.uuid4(), name=name or path.name, path=path,
                          size=path.stat().st_size, checksum=("sha256", sha256(path)),
                          file_type=file_type, metadata=metadata or {})


def provenance(inputs: list[AlgorithmInput]) -> ProductProvenance:
    return ProductProvenance(algorithm="ccd_stack", algorithm_version="1.1.0", parameters={},
                             inputs=input_records(inputs), job_id=str(uuid.uuid4()))


# -- ingest -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_ingest_reads_the_header_facts_of_real_files(path: Path) -> None:
    report = ingest_fits(path, ("sha256", sha256(path)))
    meta = report.metadata
    sci = science_hdu(path)
    with fits.open(path) as hdul:
        headers = [hdul[sci].header, hdul[0].header]
        data_shape = list(hdul[sci].data.shape)
        hdus = len(hdul)

    def header(keyword: str) -> Any:
        return next((h[keyword] for h in headers if keyword in h), None)

    assert meta["instrument"] == header("INSTRUME")
    assert meta["telescope"] == header("TELESCOP")
    assert meta["date_obs"] == header("DATE-OBS")
    assert meta["exptime"] == header("EXPTIME")
    assert meta["object"] == header("OBJECT")
    assert meta["unit"] == header("BUNIT")
    assert meta["shape"] == data_shape
    assert meta["image_hdu"] == sci
    assert meta["hdus"] == report.hdus == hdus
    assert report.checksum == ("sha256", sha256(path))


def test_ingest_facts_of_the_stis_and_saao_frames() -> None:
    stis = ingest_fits(STIS, None).metadata
    assert (stis["telescope"], stis["instrument"], stis["image_extname"]) == \
        ("HST", "STIS", "SCI")
    assert stis["shape"] == [44, 62] and stis["exptime"] == 30.0
    assert stis["unit"] == "COUNTS" and stis["date_obs"] == "1998-04-20"
    assert (stis["frame_type"], stis["frame_type_keyword"]) == ("SPECTROSCOPIC", "OBSTYPE")
    saao = ingest_fits(SAAO, ("md5", hashlib.md5(SAAO.read_bytes()).hexdigest())).metadata
    assert saao["frame_type"] == "object" and saao["object"] == "rf0420"
    assert saao["frame_type_keyword"] == "IMAGETYP"
    assert saao["shape"] == [520, 536] and saao["exptime"] == 150.04


def test_a_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FitsRejected, match=r"sha256 checksum mismatch: recorded 00+, the file"):
        ingest_fits(SAAO, ("sha256", "0" * 64))
    with pytest.raises(FitsRejected, match="unsupported checksum algorithm 'crc99'"):
        ingest_fits(SAAO, ("crc99", "abc"))


@pytest.mark.parametrize("keep", [0.5, 0.999], ids=["half", "last-block-short"])
def test_a_truncated_file_is_refused(tmp_path: Path, keep: float) -> None:
    data = SAAO.read_bytes()
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(data[: int(len(data) * keep)])
    reason = re.escape("truncated.fits: not a readable FITS file")
    with pytest.raises(FitsRejected, match=reason) as e:
        ingest_fits(truncated, None)
    assert e.value.reason.startswith("truncated.fits: ")


def test_a_file_that_is_not_fits_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.fits"
    junk.write_text("SIMPLE? no, a shopping list\n" * 200)
    with pytest.raises(FitsRejected, match=re.escape("junk.fits: not a readable FITS file")):
        ingest_fits(junk, None)
    with pytest.raises(FitsRejected, match=re.escape("missing.fits: no such file")):
        ingest_fits(tmp_path / "missing.fits", None)


def test_datasum_and_checksum_are_verified_and_a_flipped_byte_detected(tmp_path: Path) -> None:
    path = tmp_path / "with_checksum.fits"
    fits.PrimaryHDU(fits.getdata(SAAO).astype(np.float32),
                    header=fits.getheader(SAAO)).writeto(path, checksum=True)
    assert "DATASUM" in fits.getheader(path) and "CHECKSUM" in fits.getheader(path)
    report = ingest_fits(path, ("sha256", sha256(path)))
    assert report.fits_checksums_verified == 1
    with fits.open(path) as hdul:
        data_start = hdul.fileinfo(0)["datLoc"]
    raw = bytearray(path.read_bytes())
    raw[data_start + 1001] ^= 0x01  # one bit of the data
    path.write_bytes(bytes(raw))
    with pytest.raises(FitsRejected, match="DATASUM does not match"):
        ingest_fits(path, None)


def test_a_table_only_file_has_no_image(tmp_path: Path) -> None:
    path = tmp_path / "table.fits"
    Table({"a": [1, 2, 3]}).write(path)
    report = ingest_fits(path, None)
    assert report.metadata["shape"] is None and report.metadata["image_hdu"] is None
    with pytest.raises(InvalidCommand, match=re.escape("table.fits is not an image")):
        validate_inputs("ccd_stack", None, [as_input(path, metadata=report.metadata)], {})


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_image_rows_read_bands_of_the_science_image(path: Path) -> None:
    expected = fits.getdata(path, science_hdu(path)).astype(np.float32)
    with open_image_rows(path) as rows:
        assert rows.shape == expected.shape
        band = rows[3:11]
        assert band.dtype == np.float32
        np.testing.assert_array_equal(band, expected[3:11])


def test_image_rows_of_gzipped_and_tile_compressed_files(tmp_path: Path) -> None:
    expected = fits.getdata(SAAO).astype(np.float32)
    gz = tmp_path / "saao.fits.gz"
    fits.PrimaryHDU(fits.getdata(SAAO), header=fits.getheader(SAAO)).writeto(gz)
    tiled = tmp_path / "saao_tiled.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(expected, compression_type="RICE_1",
                                                       quantize_level=0.0)]).writeto(tiled)
    for path in (gz, tiled):
        with open_image_rows(path) as rows:
            assert rows.shape == expected.shape
            np.testing.assert_array_equal(rows[100:140], expected[100:140])


# -- ccd_stack on real frames ---------------------------------------------------------------------
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_ccd_stack_reduces_one_real_frame(tmp_path: Path, path: Path) -> None:
    inputs = [as_input(path, "raw_science", ingest_fits(path, None).metadata)]
    algo, params, plan = validate_inputs("ccd_stack", "1.1.0", inputs, {"threshold_sigma": 5})
    assert plan.steps == ["classify", "combine", "background", "detect", "write_products"]
    reporter = LocalReporter()
    products = algo.run(inputs, params, tmp_path, reporter, provenance(inputs))
    assert reporter.completed == plan.steps and reporter.fraction == 1.0
    image, catalog = products
    assert (image.kind, image.media_type) == ("combined_image", "application/fits")
    assert (catalog.kind, catalog.media_type) == ("source_catalog", "text/x-ecsv")
    # one frame: the combined image is the frame itself
    expected = fits.getdata(path, science_hdu(path)).astype(np.float32)
    np.testing.assert_array_equal(fits.getdata(image.path), expected)
    assert image.metrics["nframes"] == 1 and image.metrics["rejected_pixels"] == 0
    assert float(image.metrics["noise"]) > 0
    sources = Table.read(catalog.path, format="ascii.ecsv")
    assert len(sources) == image.metrics["source_count"] == catalog.metrics["source_count"]


@pytest.mark.parametrize("path", [SAAO, STIS], ids=lambda p: p.name)
def test_ccd_stack_stacks_copies_of_a_scaled_integer_frame(tmp_path: Path, path: Path) -> None:
    """BZERO-scaled int16 data read band by band from three files: the mean of equal frames
    is the frame."""
    copies = []
    for i in range(3):
        shutil.copy(path, tmp_path / f"copy{i}.fits")
        copies.append(as_input(tmp_path / f"copy{i}.fits", "science"))
    algo, params, _ = validate_inputs("ccd_stack", None, copies, {"chunk_rows": 7})
    image = algo.run(copies, params, tmp_path / "out", LocalReporter(), provenance(copies))[0]
    expected = fits.getdata(path, science_hdu(path)).astype(np.float32)
    np.testing.assert_array_equal(fits.getdata(image.path), expected)
    assert image.metrics["nframes"] == 3 and image.metrics["rejected_pixels"] == 0


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("path", [SAAO, STIS], ids=lambda p: p.name)
def test_ccd_stack_combines_a_real_frame_with_cosmic_rays(tmp_path: Path, path: Path,
                                                          n: int) -> None:
    """n exposures of a real frame: the frame plus independent read and photon noise (the
    SAAO header's GAIN 1.9 e-/ADU and RDNOISE 5 ADU) and 40 cosmic rays a frame of 20 sigma
    to 30,000 ADU, in pixels no other frame's ray hits. The combine removes every ray — with
    3 and 5 frames too, where astropy's sigma_clip keeps them all — and elsewhere gives
    astropy's clipped mean."""
    from astropy.stats import sigma_clip

    frame = fits.getdata(path, science_hdu(path)).astype(np.float32)
    header = fits.getheader(path, science_hdu(path))
    gain, read_noise = 1.9, 5.0
    sigma = np.sqrt(np.clip(frame, 0, None) / gain + read_noise**2).astype(np.float32)
    rng = np.random.default_rng(5)
    stack = np.empty((n, *frame.shape), dtype=np.float32)
    hits = np.zeros(stack.shape, dtype=bool)
    pixels = rng.choice(frame.size, (n, 40), replace=False)
    for i in range(n):
        stack[i] = frame + rng.normal(0, 1, frame.shape).astype(np.float32) * sigma
        ys, xs = np.divmod(pixels[i], frame.shape[1])
        stack[i, ys, xs] += np.maximum(20 * sigma[ys, xs], rng.uniform(0, 30000, 40))
        hits[i, ys, xs] = True
    inputs = []
    for i in range(n):
        out = tmp_path / f"exposure_{i}.fits"
        fits.PrimaryHDU(stack[i], header=fits.Header({"IMAGETYP": "OBJECT",
                                                      "BUNIT": header.get("BUNIT")})
                        ).writeto(out)
        inputs.append(as_input(out))
    algo, params, _ = validate_inputs("ccd_stack", None, inputs, {"chunk_rows": 50})
    image = algo.run(inputs, params, tmp_path / "out", LocalReporter(), provenance(inputs))[0]
    combined = fits.getdata(image.path)
    hit = hits.any(axis=0)
    if n < 8:  # a lone outlier never lies 3 standard deviations out: astropy keeps the rays
        assert not sigma_clip(stack, sigma=3.0, maxiters=5, axis=0).mask[hits].any()
    # the reference: astropy's clipped mean of the same exposures without the rays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns of the NaNs it clips
        reference = sigma_clip(np.where(hits, np.nan, stack), sigma=3.0, maxiters=5, axis=0)
    ref_image = reference.mean(axis=0).filled(np.nan)
    assert np.max(np.abs(combined - ref_image)[hit] / sigma[hit]) < 0.5  # the rays are gone
    same = np.abs(combined - ref_image) <= 1e-5 * np.abs(ref_image)
    assert same.mean() > 0.999
    assert image.metrics["nframes"] == n
    assert int(image.metrics["rejected_pixels"]) >= int(hits.sum())


def test_the_combined_image_carries_its_provenance(tmp_path: Path) -> None:
    inputs = [as_input(SAAO, "science")]
    algo, params, _ = validate_inputs("ccd_stack", None, inputs, {"sigma": 2.5})
    prov = provenance(inputs)
    image, catalog = algo.run(inputs, params, tmp_path, LocalReporter(), prov)
    header = fits.getheader(image.path)
    history = [str(h) for h in header["HISTORY"]]
    assert all(len(h) <= 72 for h in history)
    # one fact a card: the input's role and name, what said the role, its id, its hash whole
    at = history.index("input 1/1 science a8280271.fits")
    assert history[at + 1:at + 4] == ["input 1/1 from file_type 'science'",
                                      f"input 1/1 file_id={inputs[0].file_id}",
                                      f"sha256:{sha256(SAAO)}"]
    assert "obsledger ccd_stack 1.1.0" in history and "parameter sigma=2.5" in history
    assert f"software numpy {np.__version__}" in history
    assert header["NCOMBINE"] == 1 and header["ALGNAME"] == "ccd_stack"
    assert (header["NBIAS"], header["NDARK"], header["NFLAT"]) == (0, 0, 0)
    assert header["ALGVERS"] == "1.1.0" and header["OBSLJOB"] == prov.job_id
    assert header["QNOISE"] == pytest.approx(float(image.metrics["noise"]))
    with fits.open(image.path, checksum=True) as hdul:  # each HDU has its own checksums
        for hdu in hdul:
            assert hdu.verify_datasum() == 1 and hdu.verify_checksum() == 1
        assert [h.name for h in hdul] == ["PRIMARY", "PROVENANCE"]
    table = Table.read(image.path, hdu="PROVENANCE")
    assert list(table["ROLE"]) == ["science"] and list(table["NAME"]) == ["a8280271.fits"]
    assert (table["CHECKSUM_ALGORITHM"][0], table["CHECKSUM"][0]) == ("sha256", sha256(SAAO))
    assert table["FILE_ID"][0] == str(inputs[0].file_id)
    assert sha256(SAAO).encode() in image.path.read_bytes()  # a search of the file finds it
    meta = Table.read(catalog.path, format="ascii.ecsv").meta["provenance"]
    assert meta["algorithm"] == "ccd_stack" and meta["parameters"]["sigma"] == 2.5
    assert meta["inputs"][0]["checksum"] == f"sha256:{sha256(SAAO)}"
    assert meta["inputs"][0]["role"] == "science"
    assert image.inputs == catalog.inputs and image.inputs[0].role == "science"


def test_hashes_too_long_for_a_card_and_names_outside_ascii(tmp_path: Path) -> None:
    """A sha512 (128 hex digits) cannot fit an 80-character card: it is whole in the
    PROVENANCE table and the HISTORY says so; a name outside ASCII is escaped, not refused."""
    named = tmp_path / "café.fits"
    shutil.copy(SAAO, named)
    digest = hashlib.sha512(named.read_bytes()).hexdigest()
    inputs = [AlgorithmInput(uuid.uuid4(), named.name, named, named.stat().st_size,
                             ("sha512", digest), "raw_science")]
    algo, params, _ = validate_inputs("ccd_stack", None, inputs, {})
    image = algo.run(inputs, params, tmp_path / "out", LocalReporter(), provenance(inputs))[0]
    history = [str(h) for h in fits.getheader(image.path)["HISTORY"]]
    assert "input 1/1 science caf\\xe9.fits" in history
    assert "input 1/1 sha512: see the PROVENANCE table" in history
    table = Table.read(image.path, hdu="PROVENANCE")
    assert (table["CHECKSUM_ALGORITHM"][0], table["CHECKSUM"][0]) == ("sha512", digest)
    assert digest.encode() in image.path.read_bytes()


# -- ccd_stack with calibration frames from FITS headers ---------------------------------------
def write_frame(path: Path, data: np.ndarray, imagetyp: str, exptime: float) -> Path:
    header = fits.Header({"IMAGETYP": imagetyp, "EXPTIME": exptime, "BUNIT": "adu"})
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)
    return path


def test_ccd_stack_calibrates_with_frames_it_classifies_from_headers(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    shape = (90, 110)
    yy, xx = np.indices(shape)
    bias = 320.0 + 4.0 * np.cos(yy / 7.0)
    dark_rate = 0.05 + 0.5 * (rng.random(shape) < 0.02)
    flat = 1.0 - 0.2 * ((xx - 55) ** 2 + (yy - 45) ** 2) / 55.0**2
    sky = 150.0 + gaussian_star(shape, 40.3, 50.7, 400.0) + gaussian_star(shape, 80.6, 20.2,
                                                                           250.0)

    def exposure(signal: np.ndarray, t: float) -> np.ndarray:
        return bias + dark_rate * t + signal * flat + rng.normal(0, 3.0, shape)

    inputs = []
    for i in range(7):
        inputs.append(as_input(write_frame(tmp_path / f"b{i}.fits", exposure(0 * sky, 0.0),
                                           "BIAS", 0.0)))
        inputs.append(as_input(write_frame(tmp_path / f"d{i}.fits", exposure(0 * sky, 300.0),
                                           "DARK", 300.0)))
        inputs.append(as_input(write_frame(tmp_path / f"f{i}.fits",
                                           exposure(np.full(shape, 8000.0 + 300 * i), 3.0),
                                           "FLAT", 3.0)))
        inputs.append(as_input(write_frame(tmp_path / f"s{i}.fits", exposure(sky, 120.0),
                                           "LIGHT", 120.0)))
    # file metadata from ingest, as the worker hands it over
    inputs = [AlgorithmInput(i.file_id, i.name, i.path, i.size, i.checksum, None,
                             ingest_fits(i.path, i.checksum).metadata) for i in inputs]
    algo, params, plan = validate_inputs("ccd_stack", "1.1.0", inputs, {})
    assert plan.steps == ["classify", "master_bias", "master_dark", "master_flat", "combine",
                          "background", "detect", "write_products"]
    assert plan.notes[0] == "7 science, 7 bias, 7 dark, 7 flat"
    reporter = LocalReporter()
    image, catalog = algo.run(inputs, params, tmp_path / "out", reporter, provenance(inputs))
    assert reporter.completed == plan.steps
    combined = fits.getdata(image.path)
    recovered = combined / np.median(flat)  # the master flat is normalised to median 1
    assert np.std(recovered - sky) < 3 * 3.0 / np.sqrt(7)
    assert image.metrics["nframes"] == 7 and image.metrics["calibration_frames"] == 21
    header = fits.getheader(image.path)
    assert header["BUNIT"] == "adu"
    # NCOMBINE: the science frames combined; the calibration frames in their own keywords
    assert (header["NCOMBINE"], header["NBIAS"], header["NDARK"], header["NFLAT"]) == \
        (7, 7, 7, 7)
    # every frame's role is the one its IMAGETYP gave it, in the product and its HISTORY
    kinds = {"b": ("bias", "BIAS"), "d": ("dark", "DARK"), "f": ("flat", "FLAT"),
             "s": ("science", "LIGHT")}
    assert [(i.name, i.role, i.classified_from) for i in image.inputs] == [
        (i.name, kinds[i.name[0]][0], f"IMAGETYP '{kinds[i.name[0]][1]}'") for i in inputs]
    history = [str(h) for h in header["HISTORY"]]
    assert "input 1/28 bias b0.fits" in history and "input 1/28 from IMAGETYP 'BIAS'" in history
    assert "input 4/28 science s0.fits" in history
    assert list(Table.read(image.path, hdu="PROVENANCE")["ROLE"]) == [
        kinds[i.name[0]][0] for i in inputs]
    sources = Table.read(catalog.path, format="ascii.ecsv")
    assert sorted(zip(np.round(sources["x"]), np.round(sources["y"]), strict=True)) == \
        [(40.0, 51.0), (81.0, 20.0)]


def test_a_flat_without_signal_is_refused_when_run(tmp_path: Path) -> None:
    science = write_frame(tmp_path / "s.fits", np.full((20, 30), 100.0), "OBJECT", 10.0)
    flat = write_frame(tmp_path / "f.fits", np.zeros((20, 30)), "FLAT", 1.0)
    inputs = [as_input(science), as_input(flat)]
    algo, params, _ = validate_inputs("ccd_stack", None, inputs, {})
    with pytest.raises(InvalidCommand, match="flat frame 0 has no positive signal") as e:
        algo.run(inputs, params, tmp_path / "out", LocalReporter(), provenance(inputs))
    assert e.value.field == "inputs"


def test_a_field_without_sources_gives_an_empty_catalogue(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    inputs = [as_input(write_frame(tmp_path / f"n{i}.fits", rng.normal(50, 2, (64, 64)),
                                   "OBJECT", 5.0)) for i in range(3)]
    algo, params, _ = validate_inputs("ccd_stack", None, inputs, {})
    image, catalog = algo.run(inputs, params, tmp_path / "out", LocalReporter(),
                              provenance(inputs))
    table = Table.read(catalog.path, format="ascii.ecsv")
    assert len(table) == 0 and table.colnames == ["id", "x", "y", "flux", "peak", "npix"]
    assert image.metrics["source_count"] == 0
    assert float(image.metrics["noise"]) == pytest.approx(2 / np.sqrt(3), rel=0.15)


def test_cancelling_a_run_stops_it_between_steps_or_bands(tmp_path: Path) -> None:
    inputs = [as_input(SAAO, "science")]
    algo, params, _ = validate_inputs("ccd_stack", None, inputs, {"chunk_rows": 16})
    reporter = LocalReporter(on_step=lambda name: reporter.cancel() if name == "combine"
                             else None)
    with pytest.raises(ReductionCancelled):
        algo.run(inputs, params, tmp_path, reporter, provenance(inputs))
    assert reporter.steps == ["classify", "combine"] and reporter.completed == ["classify"]
    assert not (tmp_path / "combined_image.fits").exists()


# -- plan() refusals and the registry -------------------------------------------------------------
def test_plan_refuses_inputs_it_cannot_use(tmp_path: Path) -> None:
    saao_meta = ingest_fits(SAAO, None).metadata
    stis_meta = ingest_fits(STIS, None).metadata
    with pytest.raises(InvalidCommand, match=r"differ in shape.*520x536.*44x62"):
        validate_inputs("ccd_stack", None, [as_input(SAAO, None, saao_meta),
                                            as_input(STIS, None, stis_meta)], {})
    with pytest.raises(InvalidCommand, match=r"no science frame among the inputs: "
                                             r"a8280271.fits \(bias\)"):
        validate_inputs("ccd_stack", None, [as_input(SAAO, "bias", saao_meta)], {})
    with pytest.raises(InvalidCommand, match="at least one science frame; no inputs"):
        validate_inputs("ccd_stack", None, [], {})
    with pytest.raises(InvalidCommand, match="cannot use"):
        validate_inputs("ccd_stack", None, [as_input(SAAO, "raw_arc", saao_meta)], {})
    notes = tmp_path / "notes.txt"
    notes.write_text("observing log")
    with pytest.raises(InvalidCommand, match=re.escape("notes.txt is not a FITS file")):
        validate_inputs("ccd_stack", None, [as_input(notes, "science")], {})
    with pytest.raises(InvalidCommand, match="sigma") as e:
        validate_inputs("ccd_stack", None, [as_input(SAAO, "science", saao_meta)],
                        {"sigma": -1})
    assert e.value.field == "parameters.sigma"
    with pytest.raises(InvalidCommand, match="bogus"):
        validate_inputs("ccd_stack", None, [as_input(SAAO, "science", saao_meta)],
                        {"bogus": 1})


def test_plan_reads_the_header_when_the_file_was_not_ingested(tmp_path: Path) -> None:
    copy = tmp_path / "copy.fits"
    shutil.copy(SAAO, copy)
    plan = algorithm("ccd_stack").plan([as_input(copy)], algorithm("ccd_stack").parameters({}))
    assert plan.notes[0] == "1 science"
    not_local = as_input(copy)
    not_local = AlgorithmInput(not_local.file_id, "elsewhere.fits", tmp_path / "absent.fits",
                               1, None, "science", {})
    plan = algorithm("ccd_stack").plan([not_local], algorithm("ccd_stack").parameters({}))
    assert any("shape not known yet" in n for n in plan.notes)
    # a dark among frames without exposure times is subtracted unscaled, and the plan says so
    facts = {"shape": [520, 536], "exptime": None, "frame_type": None}
    plan = algorithm("ccd_stack").plan(
        [as_input(copy, "science", facts), as_input(copy, "dark", facts, name="dark.fits")],
        algorithm("ccd_stack").parameters({}))
    assert plan.steps[:3] == ["classify", "master_dark", "combine"]
    assert "exposure times not all known: the master dark is subtracted unscaled" in plan.notes
    assert "no bias frames: not bias-subtracted" in plan.notes


def test_the_registry_describes_ccd_stack() -> None:
    a = algorithm("ccd_stack")
    assert (a.name, a.version) == ("ccd_stack", "1.1.0")
    assert algorithm("ccd_stack", "1.1.0") is a
    assert a in registered_algorithms()
    d = describe(a)
    assert d["parameters"]["properties"]["sigma"]["default"] == 3.0
    assert d["parameters"]["additionalProperties"] is False
    assert [p["kind"] for p in d["products"]] == ["combined_image", "source_catalog"]
    assert d["steps"][0] == "classify"
    with pytest.raises(UnknownAlgorithm, match="no algorithm named 'nope'"):
        algorithm("nope")
    with pytest.raises(UnknownAlgorithm, match=re.escape("has no version '9.9'")) as e:
        algorithm("ccd_stack", "9.9")
    assert e.value.field == "version"
