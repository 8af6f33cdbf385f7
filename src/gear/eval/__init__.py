"""Evaluation: FID with the standard Inception, precision/recall, PSNR/SSIM, codebook statistics,
a small reference classifier, export for the ADM evaluator and its protocol (gFID, sFID, IS, precision/recall)."""

from gear.eval.adm import ADMEvaluator, ADMMetrics
from gear.eval.classifier import (
    Classifier,
    ClassifierConfig,
    ClassifierResult,
    classifier_accuracy,
    classifier_features,
    predict,
    train_classifier,
)
from gear.eval.codebook import CodebookCounter, CodebookStats, codebook_stats
from gear.eval.evaluate import (
    ClassifierFeatures,
    FeatureExtractor,
    GenerationMetrics,
    ReconstructionMetrics,
    balanced_labels,
    evaluate_generation,
    evaluate_reconstruction,
    make_feature_extractor,
    reference_stats,
)
from gear.eval.export import save_adm_npz
from gear.eval.fid import FeatureStats, cached_reference_stats, compute_stats, fid_from_stats, frechet_distance, stats_key
from gear.eval.image_metrics import psnr, psnr_per_image, ssim, ssim_per_image
from gear.eval.inception import FIDInception
from gear.eval.prdc import PrecisionRecall, precision_recall

__all__ = [
    "ADMEvaluator",
    "ADMMetrics",
    "Classifier",
    "ClassifierConfig",
    "ClassifierFeatures",
    "ClassifierResult",
    "CodebookCounter",
    "CodebookStats",
    "FIDInception",
    "FeatureExtractor",
    "FeatureStats",
    "GenerationMetrics",
    "PrecisionRecall",
    "ReconstructionMetrics",
    "balanced_labels",
    "cached_reference_stats",
    "classifier_accuracy",
    "classifier_features",
    "codebook_stats",
    "compute_stats",
    "evaluate_generation",
    "evaluate_reconstruction",
    "fid_from_stats",
    "frechet_distance",
    "make_feature_extractor",
    "precision_recall",
    "predict",
    "psnr",
    "psnr_per_image",
    "reference_stats",
    "save_adm_npz",
    "ssim",
    "ssim_per_image",
    "stats_key",
    "train_classifier",
]
