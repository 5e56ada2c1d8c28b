"""Import of elastix parameter files: the text-format reader and the mapping onto RegistrationConfig."""

import pytest

from fastimpact.config import RegistrationConfig
from fastimpact.elastix_params import (
    _jacobian_available,
    config_from_elastix,
    parse_elastix_text,
    read_elastix_parameters,
)
from fastimpact.errors import ConfigError
from fastimpact.features.settings import impact_settings

# A three-level IMPACT + Mattes MI map in the layout of the reference parameter maps: per-level
# ImpactXxx<k> keys, two models at the finest level, sizes given per axis.
IMPACT_MAP = """\
// ********** Components
(Registration "MultiMetricMultiResolutionRegistration")
(Metric "Impact" "AdvancedMattesMutualInformation")
(Metric0Weight 1.0)
(Metric1Weight 0.1)   // a little MI
(Transform "RecursiveBSplineTransform")
(Optimizer "AdaptiveStochasticGradientDescent")
(ImageSampler "RandomCoordinate")
(Interpolator "BSplineInterpolator")
(BSplineInterpolationOrder 3)
(ResampleInterpolator "FinalBSplineInterpolator")
(FinalBSplineInterpolationOrder 3)
(NumberOfResolutions 3)
(MaximumNumberOfIterations 300 200 100)
(NumberOfSpatialSamples 2000)
(FinalGridSpacingInPhysicalUnits 8 8 8)
(NumberOfHistogramBins 48)
(ASGDParameterEstimationMethod "DisplacementDistribution")
(RandomSeed 42)

// ********** IMPACT
(ImpactModelsPath0 "/Data/Models/MIND/R1D2.pt")
(ImpactDimension0 3)
(ImpactNumberOfChannels0 1)
(ImpactPatchSize0 0 0 0)
(ImpactVoxelSize0 6 6 6)
(ImpactLayersMask0 "1")
(ImpactSubsetFeatures0 12)
(ImpactPCA0 0)
(ImpactDistance0 "L2")
(ImpactLayersWeight0 1)

(ImpactModelsPath1 "/Data/Models/MIND/R2D1_3D.pt")
(ImpactDimension1 3)
(ImpactNumberOfChannels1 1)
(ImpactPatchSize1 0 0 0)
(ImpactVoxelSize1 3 3 3)
(ImpactLayersMask1 "1")
(ImpactSubsetFeatures1 8)
(ImpactPCA1 0)
(ImpactDistance1 "NCC")
(ImpactLayersWeight1 1)

(ImpactModelsPath2 "{onnx}" "MIND/R1D2_3D.pt")
(ImpactDimension2 3 3)
(ImpactNumberOfChannels2 1 1)
(ImpactPatchSize2 0 0 0 0 0 0)
(ImpactVoxelSize2 1.5 1.5 1.5 1 1 1)
(ImpactLayersMask2 "01" "1")
(ImpactSubsetFeatures2 32 0)
(ImpactPCA2 0 0)
(ImpactDistance2 "Cosine" "L1")
(ImpactLayersWeight2 1.0 0.5)

(ImpactMode "Static")
(ImpactGPU -1)
(ImpactUseMixedPrecision "false")
(ImpactFeaturesMapUpdateInterval -1)
(ImpactWriteFeatureMaps "false")

// ********** things fastimpact does not read
(WriteResultImage "false")
(FancyNewOption 3)
"""

MI_MAP = """\
(FixedInternalImagePixelType "float")
(MovingInternalImagePixelType "float")
(FixedImageDimension 3)
(MovingImageDimension 3)
(UseDirectionCosines "true")
(Registration "MultiResolutionRegistration")
(Interpolator "BSplineInterpolator")
(ResampleInterpolator "FinalLinearInterpolator")
(Resampler "DefaultResampler")
(FixedImagePyramid "FixedRecursiveImagePyramid")
(MovingImagePyramid "MovingRecursiveImagePyramid")
(Optimizer "AdaptiveStochasticGradientDescent")
(Transform "BSplineTransform")
(Metric "AdvancedMattesMutualInformation")
(FinalGridSpacingInPhysicalUnits 10.0)
(GridSpacingSchedule 8.0 4.0 2.0)
(HowToCombineTransforms "Compose")
(NumberOfHistogramBins 32)
(NumberOfResolutions 3)
(MaximumNumberOfIterations 250)
(MaximumStepLength 2.0)
(NumberOfSpatialSamples 2048 4096)
(NewSamplesEveryIteration "true")
(ImageSampler "Random")
(BSplineInterpolationOrder 1)
(RandomSeed 7)
"""


def write(tmp_path, text, name="params.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reader_comments_quoting_and_types(tmp_path):
    text = (
        "// a full-line comment\n"
        "   \n"
        '(Metric "AdvancedMattesMutualInformation")  // trailing comment\n'
        '\t(ImpactLayersMask0\t"01" 10 "1")\n'
        '(ImpactModelsPath0 "/a dir/with spaces/m.onnx")\n'
        "(Numbers 3 -1 2.5 1e-3 .5 007)\n"
        '(Flags "true" false TRUE)\n'
        "(Word RandomCoordinate)\n"
    )
    params = read_elastix_parameters(write(tmp_path, text))
    assert params["Metric"] == ["AdvancedMattesMutualInformation"]
    # quoted values stay strings (a layer mask keeps its leading zero); unquoted ones become numbers
    assert params["ImpactLayersMask0"] == ["01", 10, "1"]
    assert params["ImpactModelsPath0"] == ["/a dir/with spaces/m.onnx"]
    assert params["Numbers"] == [3, -1, 2.5, 1e-3, 0.5, "007"]
    assert params["Flags"] == [True, False, True]
    assert params["Word"] == ["RandomCoordinate"]
    assert "metric" not in params  # names are case-sensitive as in elastix
    # elastix cuts every line at "//", inside quotes too: say so instead of reading half a value
    with pytest.raises(ConfigError, match="line 2: .*'//' inside quotes"):
        parse_elastix_text('(A 1)\n(Cut "http://example.org")', source="text")


@pytest.mark.parametrize(
    "line, needle",
    [
        ("NumberOfResolutions 3", "is not an elastix parameter"),
        ("(NumberOfResolutions 3", "is not an elastix parameter"),
        ('(Metric "AdvancedMeanSquares)', "odd number of quotes"),
        ("(NumberOfResolutions)", "needs a parameter name and at least one value"),
        ('("Metric" "AdvancedMeanSquares")', "parameter name"),
        ("(Number-Of 3)", "parameter name"),
        ("(A 1) (B 2)", "bracket outside quotes"),
        ("(RandomSeed 2)", "given twice (first on line 2)"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, needle):
    path = write(tmp_path, f"// header\n(RandomSeed 1)\n\n{line}\n")
    with pytest.raises(ConfigError) as info:
        read_elastix_parameters(path)
    msg = str(info.value)
    assert "line 4" in msg and needle in msg and str(path) in msg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_elastix_parameters(tmp_path / "nope.txt")


def test_toml_parameter_file(tmp_path):
    path = write(tmp_path, 'Metric = "AdvancedMeanSquares"\nNumberOfResolutions = 2\n'
                           'MaximumNumberOfIterations = [100, 50]\nTransform = "BSplineTransform"\n', "p.toml")
    assert read_elastix_parameters(path)["MaximumNumberOfIterations"] == [100, 50]
    fields, _ = config_from_elastix(path)
    assert fields["metric"] == "mse" and fields["levels"] == 2 and fields["iterations"] == [100, 50]


def test_realistic_impact_map(tmp_path):
    onnx = str(tmp_path / "models" / "my_net.onnx")  # need not exist: files are checked at run time
    fields, warnings = config_from_elastix(write(tmp_path, IMPACT_MAP.format(onnx=onnx)))
    assert fields == {
        "levels": 3,
        "iterations": [300, 200, 100],
        "samples": 2000,
        "grid_spacing": 8.0,
        "metric": "impact + 0.1*mi",
        "bins": 48,
        "mode": "static",
        "device": "cpu",
        "model": ["mind-r1d2", "mind-r2d1", f"{onnx} mind-r1d2"],
        "layers": ["1", "1", "01 1"],
        "voxel_size": ["6", "3", "1.5 1"],
        "distance": ["l2", "ncc", "cosine l1"],
        "layer_weights": ["1", "1", "1 0.5"],
        "subset": ["12", "8", "32 1"],
        "pca": ["0", "0", "0 0"],
        "seed": 42,
        "asgd_estimation": "displacement_distribution",
        "interpolation": "cubic",
    }
    cfg = RegistrationConfig(**fields)
    finest = impact_settings(cfg, 2, check_files=False)
    assert [m.fixed_model for m in finest.models] == [onnx, "mind-r1d2"]
    assert [(u.index, u.distance, u.weight, u.subset) for m in finest.models for u in m.layers] == [
        (1, "cosine", 1.0, 32), (0, "l1", 0.5, 1)]
    assert finest.models[1].voxel_size == 1.0
    # the subset 0 is elastix's clamp to one channel; unread keys are reported, matching ones are not
    assert any(w.startswith("ImpactSubsetFeatures2 0:") for w in warnings)
    assert "ignored: FancyNewOption (not used by fastimpact)" in warnings
    assert any(w.startswith("ignored: WriteResultImage (output") for w in warnings)
    assert any(w.startswith("ignored: ImpactNumberOfChannels<k>") for w in warnings)
    assert any("'/Data/Models/MIND/R1D2.pt' imported as the built-in mind-r1d2" in w for w in warnings)
    assert not any("ImpactUseMixedPrecision" in w or "ImageSampler" in w or "Optimizer" in w for w in warnings)


def test_plain_mi_bspline_map(tmp_path):
    fields, warnings = config_from_elastix(write(tmp_path, MI_MAP))
    assert fields == {
        "levels": 3,
        "pyramid": "shrink",  # FixedRecursiveImagePyramid
        "iterations": 250,
        # elastix reads entry l at level l and entry 0 where a level has none
        "samples": [2048, 4096, 2048],
        "grid_spacing": 20.0,  # the schedule 8/4/2 doubles: the finest spacing is 10 mm * 2
        "metric": "mi",
        "bins": 32,
        "max_step": 2.0,
        "seed": 7,
        "interpolation": "linear",
    }
    RegistrationConfig(**fields)
    assert any(w.startswith("NumberOfSpatialSamples has 2 values for 3 levels") for w in warnings)
    assert any(w.startswith("BSplineInterpolationOrder 1:") for w in warnings)
    assert any(w.startswith("Transform BSplineTransform: this file has no affine stage") for w in warnings)
    # values that agree with fastimpact's fixed design are not reported
    assert not any(w.split()[0] in ("FixedImageDimension", "UseDirectionCosines", "FixedImagePyramid",
                                    "HowToCombineTransforms", "ImageSampler", "Registration") for w in warnings)


def test_affine_only_map(tmp_path):
    text = ('(Transform "AffineTransform")\n(Metric "AdvancedNormalizedCorrelation")\n(NumberOfResolutions 2)\n'
            '(MaximumNumberOfIterations 400 200)\n(AutomaticTransformInitialization "true")\n'
            '(AutomaticTransformInitializationMethod "CenterOfGravity")\n(FinalGridSpacingInPhysicalUnits 8)\n')
    fields, warnings = config_from_elastix(write(tmp_path, text))
    assert fields == {"levels": 2, "iterations": 0, "affine": True, "affine_iterations": [400, 200],
                      "init": "moments", "metric": "ncc"}
    assert RegistrationConfig(**fields).per_level("affine_iterations") == (400, 200)
    assert "ignored: FinalGridSpacingInPhysicalUnits (affine-only file: no B-spline grid)" in warnings
    euler, warnings = config_from_elastix({"Transform": "EulerTransform", "Metric": "AdvancedMeanSquares"})
    assert euler["init"] == "none" and euler["rigid"] is True and euler["affine"] is False  # the rigid stage
    assert not any("full affine" in w for w in warnings)
    similarity, warnings = config_from_elastix({"Transform": "SimilarityTransform"})
    assert similarity["affine"] is True and any("full affine" in w for w in warnings)


def test_bending_penalty_and_metric_weights():
    fields, warnings = config_from_elastix({
        "Transform": "BSplineTransform", "NumberOfResolutions": 2,
        "Metric": ["AdvancedMeanSquares", "TransformBendingEnergyPenalty", "DisplacementMagnitudePenalty"],
        "Metric0Weight": 2.0, "Metric1Weight": [0.5, 0.05], "Metric2Weight": 1.0,
    })
    assert fields["metric"] == "2*mse" and fields["bending_weight"] == [0.5, 0.05]
    assert RegistrationConfig(**fields).per_level("bending_weight") == (0.5, 0.05)
    assert any(w.startswith("ignored: Metric DisplacementMagnitudePenalty") for w in warnings)
    # without weights elastix gives each of the N metrics 1/N
    fields, _ = config_from_elastix({"Transform": "BSplineTransform",
                                     "Metric": ["AdvancedMeanSquares", "AdvancedNormalizedCorrelation"]})
    assert fields["metric"] == "0.5*mse + 0.5*ncc"


def test_grid_schedule_that_does_not_double_is_reported():
    fields, warnings = config_from_elastix({"Transform": "BSplineTransform", "Metric": "AdvancedMeanSquares",
                                            "NumberOfResolutions": 2, "FinalGridSpacingInPhysicalUnits": [10, 10, 12],
                                            "GridSpacingSchedule": [3.0, 1.0]})
    assert fields["grid_spacing"] == pytest.approx(32 / 3)
    assert any(w.startswith("FinalGridSpacingInPhysicalUnits 10 10 12: ") and "mean" in w for w in warnings)
    assert any(w.startswith("GridSpacingSchedule 3 1: fastimpact doubles") for w in warnings)


def test_unknown_and_contradicting_keys_are_warnings(tmp_path):
    text = ('(Transform "BSplineTransform")\n(Metric "AdvancedMeanSquares")\n(MyOwnKey "x" 1)\n'
            '(BSplineTransformSplineOrder 1)\n(ErodeMask "true")\n(SP_a 1000)\n'
            '(ImpactModelsPath0 "x.onnx")\n')
    fields, warnings = config_from_elastix(write(tmp_path, text))
    assert fields == {"metric": "mse"}
    assert "ignored: MyOwnKey (not used by fastimpact)" in warnings
    assert "BSplineTransformSplineOrder 1: fastimpact's B-spline transform is cubic" in warnings
    assert "ErodeMask true: fastimpact does not erode masks" in warnings
    assert any(w.startswith("ignored: SP_a (ASGD detail") for w in warnings)
    assert "ignored: ImpactModelsPath<k> (Metric has no Impact term)" in warnings


@pytest.mark.parametrize(
    "model, needle",
    [
        ("/Data/Models/TS/M730_2_Layers.pt", "TorchScript model '/Data/Models/TS/M730_2_Layers.pt'"),
        ("./R1D2_2D.pt", "'./R1D2_2D.pt' (a 2-D MIND)"),
        ("MIND/R2D2.pt", "'MIND/R2D2.pt' (MIND radius 2, dilation 2)"),
        ("weights.bin", "model 'weights.bin' is not a built-in model"),
    ],
)
def test_unmappable_models_are_errors_naming_the_file(model, needle):
    with pytest.raises(ConfigError) as info:
        config_from_elastix({"Transform": "BSplineTransform", "Metric": "Impact", "NumberOfResolutions": 1,
                             "ImpactMode": "Static", "ImpactModelsPath0": model, "ImpactVoxelSize0": [2, 2, 2]})
    assert needle in str(info.value) and "ImpactModelsPath0" in str(info.value)


def test_fixed_and_moving_models_and_feature_normalization():
    fields, _ = config_from_elastix({
        "Transform": "BSplineTransform", "Metric": "Impact", "NumberOfResolutions": 1, "ImpactMode": "Static",
        "ImpactFixedModelsPath0": ["ct.onnx", "mind-r1d2"], "ImpactMovingModelsPath0": ["mr.onnx", "mind-r1d2"],
        "ImpactFixedLayersMask0": ["011", "1"], "ImpactMovingLayersMask0": ["011", "1"],
        "ImpactFixedVoxelSize0": [2, 2, 2, 1, 1, 1], "ImpactMovingVoxelSize0": [2, 2, 2, 1, 1, 1],
        "ImpactSubsetFeatures0": 16, "ImpactDistance0": ["L2", "Dice", "L1Cosine"],
        "ImpactFeatureNormalization0": ["l2", "none"],  # one per model -> one per compared layer
    })
    assert fields["model"] == "ct.onnx mind-r1d2" and fields["moving_model"] == "mr.onnx mind-r1d2"
    assert fields["layers"] == "011 1" and fields["voxel_size"] == "2 1"
    assert fields["distance"] == "l2 dice l1cosine" and fields["feature_norm"] == "l2 l2 none"
    level = impact_settings(RegistrationConfig(**fields), 0, check_files=False)
    assert [u.feature_norm for m in level.models for u in m.layers] == ["l2", "l2", "none"]
    with pytest.raises(ConfigError, match="compares layer k of the fixed model with layer k"):
        config_from_elastix({"Transform": "BSplineTransform", "Metric": "Impact", "ImpactMode": "Static",
                             "NumberOfResolutions": 1, "ImpactFixedModelsPath0": "a.onnx",
                             "ImpactMovingModelsPath0": "b.onnx", "ImpactFixedLayersMask0": "01",
                             "ImpactMovingLayersMask0": "10"})


def test_unsuffixed_keys_read_as_the_first_impact_release(tmp_path):
    # the layout of the reference's MIND maps: one model for every level, voxel sizes axis by axis
    text = ('(Metric "Impact")\n(Transform "RecursiveBSplineTransform")\n(NumberOfResolutions 4)\n'
            '(ImpactModelsPath "/Data/Models/MIND/R1D2.pt")\n(ImpactDimension 3)\n(ImpactPatchSize 0 0 0)\n'
            '(ImpactVoxelSize 6 6 6 3 3 3 1.5 1.5 1.5 1 1 1)\n(ImpactLayersMask "1")\n(ImpactSubsetFeatures 12)\n'
            '(ImpactDistance "L2" "L1")\n(ImpactMode "Static")\n')
    fields, warnings = config_from_elastix(write(tmp_path, text))
    assert fields["model"] == "mind-r1d2" and fields["voxel_size"] == ["6", "3", "1.5", "1"]
    assert fields["distance"] == ["l2", "l1", "l2", "l2"]  # entry k at level k, entry 0 where there is none
    assert any(w.startswith("ImpactDistance has no level suffix") for w in warnings)
    RegistrationConfig(**fields)


def test_jacobian_mode_and_patch_sizes():
    base = {"Transform": "BSplineTransform", "Metric": "Impact", "NumberOfResolutions": 1,
            "ImpactModelsPath0": "net.onnx", "ImpactVoxelSize0": 2, "ImpactGPU": 0}
    fields, warnings = config_from_elastix({**base, "ImpactMode": "Jacobian", "ImpactPatchSize0": [7, 7, 7]})
    assert fields["device"] == "cuda" and "tile_size" not in fields
    # without a mask elastix compares the first layer of each model (fastimpact's default is all layers)
    assert fields["layers"] == "1" and any(w.startswith("ImpactLayersMask0 not given") for w in warnings)
    if _jacobian_available():
        assert fields["mode"] == "jacobian" and fields["patch_size"] == "7"
    else:
        assert fields["mode"] == "static" and any(w.startswith("ImpactMode Jacobian:") for w in warnings)
        assert "patch_size" not in fields
    fields, _ = config_from_elastix({**base, "ImpactMode": "Static", "ImpactPatchSize0": [96, 96, 96]})
    assert fields["mode"] == "static" and fields["tile_size"] == 96


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"Metric": "AdvancedKappaStatistic"}, "no fastimpact equivalent"),
        ({"Metric": "AdvancedMeanSquares", "Transform": "SplineKernelTransform"}, "SplineKernelTransform"),
        ({"Metric": ["AdvancedMattesMutualInformation", "NormalizedMutualInformation"]}, "both map to mi"),
        ({"Metric": "AdvancedMeanSquares", "NumberOfSpatialSamples": 5}, "samples=5"),
        ({"Metric": "AdvancedMeanSquares", "NumberOfResolutions": 12}, "NumberOfResolutions=12"),
        ({"Metric": "AdvancedMeanSquares", "MaximumNumberOfIterations": "many"}, "MaximumNumberOfIterations"),
        ({"Metric": "Impact", "ImpactModelsPath0": "a.onnx", "NumberOfResolutions": 2}, "ImpactModelsPath1"),
        ({"Metric": "Impact", "ImpactModelsPath0": "a.onnx", "NumberOfResolutions": 1,
          "ImpactDistance0": "Euclid"}, "ImpactDistance0='Euclid'"),
        ({"Metric": "Impact", "ImpactModelsPath0": "a.onnx", "NumberOfResolutions": 1, "ImpactLayersMask0": "11",
          "ImpactDistance0": ["L1", "L2", "L2"]}, "3 values for the 2 compared layer(s)"),
    ],
)
def test_settings_fastimpact_cannot_honour_are_errors(params, needle):
    with pytest.raises(ConfigError) as info:
        config_from_elastix({"Transform": "BSplineTransform", "ImpactMode": "Static", **params})
    assert needle in str(info.value)


def test_pyramid_kinds_and_schedules_are_read():
    text = """(NumberOfResolutions 3)
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(FixedImagePyramidSchedule 4 4 2  2 2 1  1 1 1)
(MovingImagePyramidSchedule 4 4 2  2 2 1  1 1 1)
"""
    fields, warnings = config_from_elastix(parse_elastix_text(text))
    assert fields["pyramid"] == "smooth"
    assert fields["pyramid_schedule"] == ("4.0 4.0 2.0", "2.0 2.0 1.0", "1.0 1.0 1.0")
    assert not any("Pyramid" in w for w in warnings)
    cfg = RegistrationConfig(**fields)
    from fastimpact.pyramid import plan_pyramid

    plan = plan_pyramid((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 3, cfg.pyramid, cfg.pyramid_schedule, cfg.pyramid_sigma)
    assert [p.sigma_mm for p in plan.fixed] == [(2.0, 2.0, 1.0), (1.0, 1.0, 0.5), (0.5, 0.5, 0.5)]

    generic = """(NumberOfResolutions 2)
(FixedImagePyramid "FixedGenericImagePyramid")
(FixedImagePyramidRescaleSchedule 2 2 2 1 1 1)
(FixedImagePyramidSmoothingSchedule 3 3 3 0 0 0)
"""
    fields, _ = config_from_elastix(parse_elastix_text(generic))
    assert fields["pyramid"] == "shrink" and fields["pyramid_schedule"] == ("2.0 2.0 2.0", "1.0 1.0 1.0")
    assert fields["pyramid_sigma"] == ("3.0 3.0 3.0", "0.0 0.0 0.0")
    fields, _ = config_from_elastix(parse_elastix_text('(NumberOfResolutions 2)\n(FixedImagePyramid "FixedShrinkingImagePyramid")\n'))
    assert fields["pyramid_sigma"] == (0.0, 0.0)
    with pytest.raises(ConfigError, match="ImagePyramidSchedule has 4 values"):
        config_from_elastix(parse_elastix_text("(NumberOfResolutions 2)\n(ImagePyramidSchedule 4 2 2 1)\n"))
    with pytest.raises(ConfigError, match="FixedImagePyramid"):
        config_from_elastix(parse_elastix_text('(FixedImagePyramid "FixedFancyPyramid")\n'))
