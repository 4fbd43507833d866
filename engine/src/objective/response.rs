//! Response knowledge (Hinton et al. 2015): the KL divergence from the teacher's temperature-
//! softened output distribution to the student's, scaled by T² so its gradients keep their size
//! as T changes. Classifiers compare one distribution per row; language models one per unpadded
//! position.

use candle_core::{DType, Result, Tensor, D};

use super::{Objective, ObjectiveInput};

/// `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`, averaged over rows or tokens; the
/// teacher is the first frozen model.
#[derive(Clone, Copy, Debug)]
pub struct ResponseKd {
    /// The softmax temperature, > 0.
    pub temperature: f64,
}

impl Objective for ResponseKd {
    fn name(&self) -> String {
        "response".into()
    }

    fn frozen_models(&self) -> usize {
        1
    }

    fn loss(&self, input: &ObjectiveInput<'_>) -> Result<Tensor> {
        let Some(teacher) = input.frozen.first() else {
            candle_core::bail!("response distillation needs a teacher");
        };
        let student = &input.output.logits;
        if student.dims() != teacher.logits.dims() {
            candle_core::bail!(
                "student logits {:?} and teacher logits {:?} differ",
                student.dims(),
                teacher.logits.dims()
            );
        }
        let classes = student.dim(D::Minus1)?;
        let rows = student.elem_count() / classes.max(1);
        // One weight per distribution: every row of a classifier, every real token of an LM.
        let weights = match student.rank() {
            3 => input
                .batch
                .attention_mask
                .to_dtype(DType::F32)?
                .flatten_all()?,
            _ => Tensor::ones(rows, DType::F32, student.device())?,
        };
        let t = self.temperature;
        let log_student =
            candle_nn::ops::log_softmax(&(student.reshape((rows, classes))? / t)?, D::Minus1)?;
        let log_teacher = candle_nn::ops::log_softmax(
            &(teacher.logits.reshape((rows, classes))? / t)?,
            D::Minus1,
        )?;
        let per_row = (log_teacher.exp()? * (&log_teacher - &log_student)?)?.sum(D::Minus1)?;
        let total = (per_row * &weights)?.sum_all()?;
        let count = weights.sum_all()?.clamp(1f32, f32::MAX)?;
        total.broadcast_div(&count)? * (t * t)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::data::{Batch, Example};
    use crate::models::{TaskModel, TaskOutput};

    #[derive(Debug)]
    struct NoModel;
    impl TaskModel for NoModel {
        fn task(&self) -> crate::spec::TaskType {
            crate::spec::TaskType::TextClassification
        }
        fn num_layers(&self) -> usize {
            0
        }
        fn forward(
            &self,
            _: &Batch,
            _: crate::models::Outputs,
            _: Option<&crate::models::common::DropoutRng>,
        ) -> Result<TaskOutput> {
            candle_core::bail!("not used")
        }
    }

    fn output(logits: [f32; 2]) -> TaskOutput {
        TaskOutput {
            logits: Tensor::new(&[logits], &Device::Cpu).unwrap(),
            hidden_states: Vec::new(),
            attentions: Vec::new(),
        }
    }

    #[test]
    fn kl_is_zero_for_equal_logits_and_matches_hand_computation() {
        let rows = [Example {
            input_ids: vec![1, 2],
            label: Some(0),
        }];
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = Batch::collate(&refs, 0, &Device::Cpu).unwrap();
        let student = output([0.0, 0.0]);
        let teacher = [output([0.0, 0.0])];
        let kd = ResponseKd { temperature: 2.0 };
        let input = ObjectiveInput {
            batch: &batch,
            model: &NoModel,
            output: &student,
            frozen: &teacher,
        };
        assert!(kd.loss(&input).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-7);
        // Teacher logits (2 ln 3, 0) at T = 2 give p = (3/4, 1/4); the student's uniform q = 1/2.
        let teacher = [output([2.0 * 3f32.ln(), 0.0])];
        let input = ObjectiveInput {
            frozen: &teacher,
            ..input
        };
        let kl = 0.75 * (0.75f32 / 0.5).ln() + 0.25 * (0.25f32 / 0.5).ln();
        let got = kd.loss(&input).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - 4.0 * kl).abs() < 1e-5, "{got} vs {}", 4.0 * kl);
        assert!(kd
            .loss(&ObjectiveInput {
                frozen: &[],
                ..input
            })
            .is_err());
    }
}
