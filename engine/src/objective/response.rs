//! Response knowledge (Hinton et al. 2015): the KL divergence from the teacher's temperature-
//! softened output distribution to the student's, scaled by T² so its gradients keep their size
//! as T changes. Classifiers compare one distribution per row; language models one per unpadded
//! position.

use candle_core::{DType, Result, Tensor, D};

use super::{Objective, ObjectiveInput};

/// `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`, averaged over rows or tokens; the
/// teacher is the first frozen model.
///
/// With `top_k`, each distribution is the teacher's `k` most likely classes (tokens), its
/// probabilities renormalised over them, against the student's log-probabilities of the same
/// classes (still normalised over all of them): a language model's vocabulary-wide teacher
/// distribution is then never kept beyond the `k` columns per token.
#[derive(Clone, Copy, Debug)]
pub struct ResponseKd {
    /// The softmax temperature, > 0.
    pub temperature: f64,
    /// How many of the teacher's classes each distribution keeps; `None` keeps all.
    pub top_k: Option<usize>,
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
        let mut log_student =
            candle_nn::ops::log_softmax(&(student.reshape((rows, classes))? / t)?, D::Minus1)?;
        let mut teacher_logits = teacher.logits.reshape((rows, classes))?.detach();
        if let Some(k) = self.top_k.filter(|&k| k < classes) {
            let top = teacher_logits
                .arg_sort_last_dim(false)?
                .narrow(1, 0, k)?
                .contiguous()?;
            teacher_logits = teacher_logits.gather(&top, 1)?;
            log_student = log_student.gather(&top, 1)?;
        }
        let log_teacher = candle_nn::ops::log_softmax(&(teacher_logits / t)?, D::Minus1)?;
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
        let kd = ResponseKd {
            temperature: 2.0,
            top_k: None,
        };
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

    #[test]
    fn top_k_keeps_the_teachers_likeliest_classes_and_passes_gradients() {
        let rows = [Example {
            input_ids: vec![1, 2],
            label: Some(0),
        }];
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = Batch::collate(&refs, 0, &Device::Cpu).unwrap();
        let var = candle_core::Var::new(&[[0.0f32, 1.0, 2.0, 3.0]], &Device::Cpu).unwrap();
        let student = TaskOutput {
            logits: var.as_tensor().clone(),
            hidden_states: Vec::new(),
            attentions: Vec::new(),
        };
        let teacher = [TaskOutput {
            logits: Tensor::new(&[[5.0f32, 0.0, 4.0, -3.0]], &Device::Cpu).unwrap(),
            hidden_states: Vec::new(),
            attentions: Vec::new(),
        }];
        let kd = ResponseKd {
            temperature: 1.0,
            top_k: Some(2),
        };
        let input = ObjectiveInput {
            batch: &batch,
            model: &NoModel,
            output: &student,
            frozen: &teacher,
        };
        let loss = kd.loss(&input).unwrap();
        // Classes 0 and 2: the teacher's p = softmax(5, 4); the student's full log-softmax there.
        let (e5, e4) = (5f32.exp(), 4f32.exp());
        let p = [e5 / (e5 + e4), e4 / (e5 + e4)];
        let z: f32 = [0f32, 1.0, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        let log_q = [0.0 - z.ln(), 2.0 - z.ln()];
        let want: f32 = (0..2).map(|i| p[i] * (p[i].ln() - log_q[i])).sum();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let grads = loss.backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let grad = grad.to_vec1::<f32>().unwrap();
        assert!(grad.iter().all(|g| g.is_finite()) && grad.iter().any(|g| *g != 0.0));
        // Equal to the full KL when k covers every class.
        let all = ResponseKd {
            temperature: 1.0,
            top_k: Some(4),
        };
        let full = ResponseKd {
            temperature: 1.0,
            top_k: None,
        };
        let a = all.loss(&input).unwrap().to_scalar::<f32>().unwrap();
        let b = full.loss(&input).unwrap().to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 1e-6);
    }
}
